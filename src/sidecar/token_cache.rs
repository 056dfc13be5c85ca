//! Outbound tokens: one per callee service, minted by the CA over mutual TLS with the current
//! SVID (so it is bound to it), cached, refreshed early, and kept through a CA outage.
//!
//! - A token is refreshed in the background once a third of its life has passed; calls keep
//!   using it meanwhile. A refresh that fails keeps the token, and is retried with backoff,
//!   until shortly before it expires. With the CA's default 10-minute tokens a token in use
//!   always has over 6½ minutes of use left when its refresh starts, which is how long a CA can
//!   be away without a single call losing its token.
//! - Fetches are single-flight per callee: a slow fetch for one service never delays calls to
//!   another, and a burst of calls to one service costs one RPC.
//! - A refusal (the policy grants this caller nothing there) is remembered for a while, so
//!   every call to a refused callee does not cost an RPC and an audit line at the CA.
//! - Tokens are bound to the certificate and to the grant in force: a new SVID, or a policy
//!   change to the callee's SPIFFE ID or to the scopes this caller holds there, fetches anew.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use http::HeaderValue;
use meshid_proto::directory::{Directory, Scope};
use meshid_proto::pb::{self, ca_client::CaClient as PbClient};
use meshid_proto::tls::CertSlot;
use meshid_proto::{Clock, SpiffeId};
use tonic::transport::Channel;
use tracing::{debug, info, warn};

use super::identity::Current;
use super::metrics::Metrics;
use crate::identity::backoff::Backoff;
use crate::identity::client::CaClient;

/// Refresh once this fraction of a token's life has passed.
pub const REFRESH_AFTER_FRACTION: f64 = 1.0 / 3.0;
/// Stop using a token this long before it expires (transit and clock skew).
pub const EXPIRY_MARGIN: Duration = Duration::from_secs(5);
/// How long a refusal is remembered (a policy change forgets it at once).
pub const REFUSAL_TTL: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenFetchError {
    #[error("the CA refuses a token for {service}: {message}")]
    Refused { service: String, message: String },
    #[error("CA unreachable: {0}")]
    Unavailable(String),
}

/// A token as the CA returned it.
pub struct Minted {
    pub access_token: String,
    pub expires_in: Duration,
}

type Fetching<'a> = Pin<Box<dyn Future<Output = Result<Minted, TokenFetchError>> + Send + 'a>>;

/// Where tokens come from: the CA over gRPC, or a fake in tests.
pub trait TokenSource: Send + Sync + 'static {
    /// What a token is bound to (the SVID in use).
    type Identity: Clone + Send + Sync + 'static;
    fn x5t(identity: &Self::Identity) -> &str;
    fn issue(&self, audience: String, identity: Self::Identity) -> Fetching<'_>;
}

/// The grant a cached token was minted under, as the directory says.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Grant {
    callee: SpiffeId,
    scopes: BTreeSet<Scope>,
}

fn grant(dir: &Directory, service: &str, me: &SpiffeId) -> Option<Grant> {
    let callee = dir.service(service)?;
    let scopes = dir
        .service_by_id(me)
        .and_then(|m| callee.callers.get(&m.name))
        .cloned()
        .unwrap_or_default();
    Some(Grant {
        callee: callee.id.clone(),
        scopes,
    })
}

struct Token {
    /// `Bearer <token>`, ready to insert (a cheap clone), marked sensitive so HTTP/2 never
    /// indexes it and `Debug` never shows it.
    header: HeaderValue,
    x5t: String,
    refresh_at: SystemTime,
    usable_until: SystemTime,
}

#[derive(Default)]
struct State {
    token: Option<Token>,
    /// A refusal, for which certificate, and until when it stands.
    refusal: Option<(TokenFetchError, String, SystemTime)>,
    /// Bumped whenever a policy change forgets what was cached: a fetch that started before
    /// stores nothing (it was asked under the old grant).
    generation: u64,
    /// The grant the token or refusal is for, and the directory sequence it was checked at.
    grant: Option<Grant>,
    checked_at: u64,
    refreshing: bool,
    /// No refresh (nor fetch when the CA is away) before this.
    retry_at: Option<SystemTime>,
    backoff: Option<Backoff>,
}

#[derive(Default)]
struct Entry {
    state: Mutex<State>,
    /// One fetch at a time per callee.
    fetch: tokio::sync::Mutex<()>,
}

pub struct TokenCache<S: TokenSource = CaTokens> {
    source: Arc<S>,
    metrics: Arc<Metrics>,
    clock: Arc<dyn Clock>,
    entries: Mutex<HashMap<String, Arc<Entry>>>,
}

enum Lookup {
    Hit(HeaderValue, bool),
    Refused(TokenFetchError),
    Miss,
}

impl<S: TokenSource> TokenCache<S> {
    pub fn new(source: S, metrics: Arc<Metrics>, clock: Arc<dyn Clock>) -> Arc<Self> {
        Arc::new(Self {
            source: Arc::new(source),
            metrics,
            clock,
            entries: Mutex::new(HashMap::new()),
        })
    }

    fn entry(&self, service: &str) -> Arc<Entry> {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = entries.get(service) {
            return e.clone();
        }
        let e = Arc::new(Entry::default());
        entries.insert(service.to_owned(), e.clone());
        e
    }

    /// What the cache holds for a call now. Forgets what a policy change made stale.
    fn lookup(
        &self,
        st: &mut State,
        dir: &Directory,
        service: &str,
        me: &SpiffeId,
        x5t: &str,
    ) -> Lookup {
        // Only a newer directory counts: a request still holding an older one must not flip
        // the grant back (and throw away what the newer one fetched).
        if dir.sequence > st.checked_at {
            let now_grant = grant(dir, service, me);
            if st.grant != now_grant {
                if st.grant.is_some() {
                    info!(
                        service,
                        "policy changed for this callee; fetching a new token"
                    );
                }
                st.token = None;
                st.refusal = None;
                st.retry_at = None;
                st.backoff = None;
                st.grant = now_grant;
                st.generation += 1;
            }
            st.checked_at = dir.sequence;
        }
        let now = self.clock.now();
        if let Some(t) = &st.token
            && t.x5t == x5t
            && now < t.usable_until
        {
            let due = now >= t.refresh_at && !st.refreshing && st.retry_at.is_none_or(|r| now >= r);
            return Lookup::Hit(t.header.clone(), due);
        }
        if let Some((e, bound, until)) = &st.refusal
            && bound == x5t
            && now < *until
        {
            return Lookup::Refused(e.clone());
        }
        if let Some(r) = st.retry_at
            && now < r
            && st.token.as_ref().is_none_or(|t| t.x5t == x5t)
        {
            return Lookup::Refused(TokenFetchError::Unavailable(
                "the CA did not answer the last token request; retrying shortly".into(),
            ));
        }
        Lookup::Miss
    }

    /// A token for calling `service` as `identity` (whose SPIFFE ID is `me`), from the cache
    /// when still good.
    pub async fn get(
        self: &Arc<Self>,
        service: &str,
        me: &SpiffeId,
        identity: &S::Identity,
        dir: &Directory,
    ) -> Result<HeaderValue, TokenFetchError> {
        let x5t = S::x5t(identity);
        let entry = self.entry(service);
        let looked = {
            let mut st = entry.state.lock().unwrap_or_else(|p| p.into_inner());
            let l = self.lookup(&mut st, dir, service, me, x5t);
            if let Lookup::Hit(_, true) = l {
                st.refreshing = true;
            }
            l
        };
        match looked {
            Lookup::Hit(header, due) => {
                self.metrics
                    .token_cache_hits
                    .fetch_add(1, Ordering::Relaxed);
                if due {
                    let (this, service, identity, entry) = (
                        self.clone(),
                        service.to_owned(),
                        identity.clone(),
                        entry.clone(),
                    );
                    tokio::spawn(async move {
                        this.refresh(&entry, &service, identity).await;
                    });
                }
                return Ok(header);
            }
            Lookup::Refused(e) => return Err(e),
            Lookup::Miss => {}
        }
        self.metrics
            .token_cache_misses
            .fetch_add(1, Ordering::Relaxed);
        let _one = entry.fetch.lock().await;
        // Another call may have fetched it while this one waited.
        {
            let mut st = entry.state.lock().unwrap_or_else(|p| p.into_inner());
            match self.lookup(&mut st, dir, service, me, x5t) {
                Lookup::Hit(header, _) => return Ok(header),
                Lookup::Refused(e) => return Err(e),
                Lookup::Miss => {}
            }
        }
        self.fetch(&entry, service, identity.clone()).await
    }

    /// Fetch and store; a refusal is remembered, an unreachable CA backs off.
    async fn fetch(
        &self,
        entry: &Entry,
        service: &str,
        identity: S::Identity,
    ) -> Result<HeaderValue, TokenFetchError> {
        let x5t = S::x5t(&identity).to_owned();
        let started = self.clock.now();
        let generation = entry
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .generation;
        let answer = self.source.issue(service.to_owned(), identity).await;
        let now = self.clock.now();
        let mut st = entry.state.lock().unwrap_or_else(|p| p.into_inner());
        st.refreshing = false;
        if st.generation != generation {
            // The policy changed while this fetch was out: its answer is for the old grant.
            return answer.and_then(|m| bearer(service, m)).map(|(h, _)| h);
        }
        let minted = match answer.and_then(|m| bearer(service, m)) {
            Ok(m) => m,
            Err(e) => {
                match &e {
                    TokenFetchError::Refused { .. } => {
                        debug!(service, "token refused: {e}");
                        // The CA's word is final: a token it would no longer mint is not used.
                        st.token = None;
                        st.refusal = Some((e.clone(), x5t, now + REFUSAL_TTL));
                    }
                    TokenFetchError::Unavailable(_) => {
                        // Never wait so long that a still valid token would run out first.
                        let left = st
                            .token
                            .as_ref()
                            .map(|t| t.usable_until.duration_since(now).unwrap_or_default());
                        let backoff = st.backoff.get_or_insert_with(|| {
                            Backoff::new(Duration::from_secs(1), Duration::from_secs(30))
                        });
                        if let Some(left) = left {
                            backoff.cap(left / 4);
                        }
                        let wait = backoff.next_delay();
                        st.retry_at = Some(now + wait);
                        match &st.token {
                            Some(t) if t.x5t == x5t && now < t.usable_until => warn!(
                                service,
                                "token refresh failed, the current token stays in use for {:?}; retrying in {wait:?}: {e}",
                                t.usable_until.duration_since(now).unwrap_or_default()
                            ),
                            _ => warn!(service, "no token; retrying in {wait:?}: {e}"),
                        }
                    }
                }
                return Err(e);
            }
        };
        let (header, life) = minted;
        let margin = EXPIRY_MARGIN.min(life / 10);
        st.token = Some(Token {
            header: header.clone(),
            x5t,
            refresh_at: started + life.mul_f64(REFRESH_AFTER_FRACTION),
            usable_until: started + life.saturating_sub(margin),
        });
        st.refusal = None;
        st.retry_at = None;
        st.backoff = None;
        Ok(header)
    }

    /// A background refresh of a token still in use.
    async fn refresh(&self, entry: &Entry, service: &str, identity: S::Identity) {
        let _one = entry.fetch.lock().await;
        if let Err(e) = self.fetch(entry, service, identity).await {
            debug!(service, "token refresh: {e}");
        }
    }
}

/// The header for a minted token.
fn bearer(service: &str, m: Minted) -> Result<(HeaderValue, Duration), TokenFetchError> {
    let mut header =
        HeaderValue::from_str(&format!("Bearer {}", m.access_token)).map_err(|_| {
            TokenFetchError::Refused {
                service: service.to_owned(),
                message: "the CA's token is not a valid header value".into(),
            }
        })?;
    header.set_sensitive(true);
    Ok((header, m.expires_in))
}

/// Tokens from the CA's `IssueToken` over mutual TLS with the SVID they are bound to.
pub struct CaTokens {
    ca: CaClient,
    /// One gRPC channel to the CA per certificate (the token binds the TLS client certificate).
    channel: tokio::sync::Mutex<Option<(String, PbClient<Channel>)>>,
}

impl CaTokens {
    pub fn new(ca: CaClient) -> Self {
        Self {
            ca,
            channel: tokio::sync::Mutex::new(None),
        }
    }

    async fn client(&self, identity: &Current) -> Result<PbClient<Channel>, TokenFetchError> {
        if let Some((bound, client)) = self.channel.lock().await.as_ref()
            && *bound == identity.x5t
        {
            return Ok(client.clone());
        }
        // Connect without holding the lock: fetches for other callees do not queue behind a
        // slow connect (two may race to connect; the last one is kept, both work).
        let client = self
            .ca
            .connect(Some(CertSlot::new(identity.key.clone())))
            .await
            .map_err(|e| TokenFetchError::Unavailable(e.to_string()))?;
        *self.channel.lock().await = Some((identity.x5t.clone(), client.clone()));
        Ok(client)
    }
}

impl TokenSource for CaTokens {
    type Identity = Arc<Current>;

    fn x5t(identity: &Arc<Current>) -> &str {
        &identity.x5t
    }

    fn issue(&self, audience: String, identity: Arc<Current>) -> Fetching<'_> {
        Box::pin(async move {
            let mut client = self.client(&identity).await?;
            let answer = client
                .issue_token(pb::IssueTokenRequest {
                    scope: String::new(),
                    audience: audience.clone(),
                })
                .await;
            match answer {
                Ok(r) => {
                    let t = r.into_inner();
                    Ok(Minted {
                        access_token: t.access_token,
                        expires_in: Duration::from_secs(t.expires_in.max(0) as u64),
                    })
                }
                // Only a decision about this caller is a refusal; anything else (the CA away,
                // overloaded, or failing inside) is retried with backoff.
                Err(s)
                    if matches!(
                        s.code(),
                        tonic::Code::PermissionDenied
                            | tonic::Code::Unauthenticated
                            | tonic::Code::InvalidArgument
                            | tonic::Code::FailedPrecondition
                            | tonic::Code::NotFound
                    ) =>
                {
                    Err(TokenFetchError::Refused {
                        service: audience,
                        message: s.message().to_owned(),
                    })
                }
                Err(s) => {
                    *self.channel.lock().await = None;
                    if s.code() == tonic::Code::Unavailable {
                        self.ca.next_replica();
                    }
                    Err(TokenFetchError::Unavailable(format!(
                        "{:?}: {}",
                        s.code(),
                        s.message()
                    )))
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshid_proto::TrustDomain;
    use meshid_proto::directory::Service;
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};

    /// A clock tests move by hand.
    #[derive(Default)]
    struct TestClock(AtomicU64);

    impl TestClock {
        fn advance(&self, d: Duration) {
            self.0.fetch_add(d.as_millis() as u64, Ordering::SeqCst);
        }
    }

    impl Clock for TestClock {
        fn now(&self) -> SystemTime {
            SystemTime::UNIX_EPOCH
                + Duration::from_secs(1_800_000_000)
                + Duration::from_millis(self.0.load(Ordering::SeqCst))
        }
    }

    /// A CA that mints `life`-long tokens, can be taken away, refuses some audiences, and can
    /// be made slow for one audience.
    struct FakeCa {
        life: Duration,
        down: AtomicBool,
        refuse_all: AtomicBool,
        calls: AtomicUsize,
        refuse: &'static str,
        slow: &'static str,
        release_slow: tokio::sync::Notify,
    }

    impl FakeCa {
        fn new(life: Duration) -> Self {
            Self {
                life,
                down: AtomicBool::new(false),
                refuse_all: AtomicBool::new(false),
                calls: AtomicUsize::new(0),
                refuse: "reports",
                slow: "slow",
                release_slow: tokio::sync::Notify::new(),
            }
        }
    }

    impl TokenSource for FakeCa {
        type Identity = String;
        fn x5t(identity: &String) -> &str {
            identity
        }
        fn issue(&self, audience: String, identity: String) -> Fetching<'_> {
            Box::pin(async move {
                let n = self.calls.fetch_add(1, Ordering::SeqCst);
                if audience == self.slow {
                    self.release_slow.notified().await;
                }
                if self.down.load(Ordering::SeqCst) {
                    return Err(TokenFetchError::Unavailable("connection refused".into()));
                }
                if audience == self.refuse || self.refuse_all.load(Ordering::SeqCst) {
                    return Err(TokenFetchError::Refused {
                        service: audience,
                        message: "invalid_scope".into(),
                    });
                }
                Ok(Minted {
                    access_token: format!("tok-{audience}-{identity}-{n}"),
                    expires_in: self.life,
                })
            })
        }
    }

    fn id(name: &str) -> SpiffeId {
        SpiffeId::parse(&format!("spiffe://cluster.local/ns/shop/sa/{name}")).unwrap()
    }

    fn directory(sequence: u64, orders_scopes: &[&str], orders_id: &str) -> Directory {
        let mut services = BTreeMap::new();
        let svc = |name: &str, sid: SpiffeId| Service {
            name: name.into(),
            id: sid,
            scopes: BTreeSet::new(),
            routes: Vec::new(),
            callers: BTreeMap::new(),
            rate_limits: BTreeMap::new(),
            opaque_ports: BTreeSet::new(),
        };
        let mut orders = svc("orders", id(orders_id));
        orders.callers.insert(
            "frontend".into(),
            orders_scopes
                .iter()
                .map(|s| Scope::parse(s).unwrap())
                .collect(),
        );
        services.insert("orders".into(), orders);
        for name in ["frontend", "reports", "slow"] {
            services.insert(name.into(), svc(name, id(name)));
        }
        Directory::new(
            sequence,
            TrustDomain::parse("cluster.local").unwrap(),
            "https://ca".into(),
            services,
        )
    }

    fn cache(life: Duration) -> (Arc<TokenCache<FakeCa>>, Arc<TestClock>) {
        let clock = Arc::new(TestClock::default());
        let c = TokenCache::new(
            FakeCa::new(life),
            Arc::new(Metrics::default()),
            clock.clone(),
        );
        (c, clock)
    }

    fn text(h: &HeaderValue) -> String {
        h.to_str().unwrap().to_owned()
    }

    /// Let spawned background refreshes run.
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn a_token_is_reused_and_refreshed_after_a_third_of_its_life() {
        let (c, clock) = cache(Duration::from_secs(600));
        let dir = directory(1, &["orders:read"], "orders");
        let me = id("frontend");
        let first = text(&c.get("orders", &me, &"cert1".into(), &dir).await.unwrap());
        clock.advance(Duration::from_secs(150));
        assert_eq!(
            text(&c.get("orders", &me, &"cert1".into(), &dir).await.unwrap()),
            first
        );
        assert_eq!(c.source.calls.load(Ordering::SeqCst), 1);
        clock.advance(Duration::from_secs(60)); // 210 s > 200 s: refresh due
        // The call is served from the cache at once; the refresh runs behind it.
        assert_eq!(
            text(&c.get("orders", &me, &"cert1".into(), &dir).await.unwrap()),
            first
        );
        settle().await;
        assert_eq!(c.source.calls.load(Ordering::SeqCst), 2);
        let second = text(&c.get("orders", &me, &"cert1".into(), &dir).await.unwrap());
        assert_ne!(second, first);
    }

    /// The figure the README gives: with the CA's default token lifetime, how long the CA can
    /// be away, starting at the worst moment, before a call has no token.
    #[tokio::test]
    async fn with_default_tokens_a_ca_outage_of_over_six_minutes_costs_no_call() {
        let default_ttl = Duration::from_secs(600); // `meshid ca serve --token-ttl` default
        let (c, clock) = cache(default_ttl);
        let dir = directory(1, &["orders:read"], "orders");
        let me = id("frontend");
        c.get("orders", &me, &"cert1".into(), &dir).await.unwrap();
        // Worst moment: the CA goes away just before the first refresh is due.
        clock.advance(default_ttl.mul_f64(REFRESH_AFTER_FRACTION) - Duration::from_secs(1));
        c.source.down.store(true, Ordering::SeqCst);
        let mut survived = Duration::ZERO;
        let step = Duration::from_secs(1);
        while c.get("orders", &me, &"cert1".into(), &dir).await.is_ok() {
            settle().await;
            clock.advance(step);
            survived += step;
            assert!(survived < Duration::from_secs(3600), "never fails?");
        }
        assert!(
            survived >= Duration::from_secs(6 * 60 + 30),
            "survived only {survived:?}"
        );
        assert!(survived <= Duration::from_secs(6 * 60 + 40), "{survived:?}");
        // Retries were bounded, not one per call.
        let calls = c.source.calls.load(Ordering::SeqCst);
        assert!(calls < 60, "{calls} token requests during the outage");
        // The CA comes back: the next call gets a new token.
        c.source.down.store(false, Ordering::SeqCst);
        clock.advance(Duration::from_secs(60));
        assert!(c.get("orders", &me, &"cert1".into(), &dir).await.is_ok());
    }

    #[tokio::test]
    async fn a_refusal_is_remembered_until_it_lapses_or_the_policy_changes() {
        let (c, clock) = cache(Duration::from_secs(600));
        let dir = directory(1, &["orders:read"], "orders");
        let me = id("frontend");
        for _ in 0..5 {
            let e = c
                .get("reports", &me, &"cert1".into(), &dir)
                .await
                .unwrap_err();
            assert!(matches!(e, TokenFetchError::Refused { .. }), "{e}");
        }
        assert_eq!(
            c.source.calls.load(Ordering::SeqCst),
            1,
            "one RPC for five calls"
        );
        clock.advance(REFUSAL_TTL + Duration::from_secs(1));
        let _ = c.get("reports", &me, &"cert1".into(), &dir).await;
        assert_eq!(c.source.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_refresh_the_ca_refuses_drops_the_token_and_does_not_storm() {
        let (c, clock) = cache(Duration::from_secs(600));
        let dir = directory(1, &["orders:read"], "orders");
        let me = id("frontend");
        c.get("orders", &me, &"cert1".into(), &dir).await.unwrap();
        // The caller is revoked at the CA; its token is due for refresh.
        c.source.refuse_all.store(true, Ordering::SeqCst);
        clock.advance(Duration::from_secs(250));
        assert!(c.get("orders", &me, &"cert1".into(), &dir).await.is_ok());
        settle().await;
        assert_eq!(c.source.calls.load(Ordering::SeqCst), 2);
        for _ in 0..20 {
            let e = c.get("orders", &me, &"cert1".into(), &dir).await;
            assert!(matches!(e, Err(TokenFetchError::Refused { .. })), "{e:?}");
            settle().await;
        }
        assert_eq!(c.source.calls.load(Ordering::SeqCst), 2, "no RPC per call");
    }

    #[tokio::test]
    async fn a_refusal_is_for_one_certificate_only() {
        let (c, _clock) = cache(Duration::from_secs(600));
        let dir = directory(1, &["orders:read"], "orders");
        let me = id("frontend");
        let _ = c.get("reports", &me, &"cert1".into(), &dir).await;
        let _ = c.get("reports", &me, &"cert2".into(), &dir).await;
        assert_eq!(
            c.source.calls.load(Ordering::SeqCst),
            2,
            "a new SVID asks again"
        );
    }

    #[tokio::test]
    async fn a_policy_change_to_the_callee_or_the_grant_fetches_a_new_token() {
        let (c, _clock) = cache(Duration::from_secs(600));
        let me = id("frontend");
        let dir1 = directory(1, &["orders:read"], "orders");
        let a = text(&c.get("orders", &me, &"cert1".into(), &dir1).await.unwrap());
        // Another policy, same grant: the token stays.
        let dir2 = directory(2, &["orders:read"], "orders");
        assert_eq!(
            text(&c.get("orders", &me, &"cert1".into(), &dir2).await.unwrap()),
            a
        );
        // The grant changes: a new token.
        let dir3 = directory(3, &["orders:read", "orders:write"], "orders");
        let b = text(&c.get("orders", &me, &"cert1".into(), &dir3).await.unwrap());
        assert_ne!(a, b);
        // The callee's SPIFFE ID changes: a new token.
        let dir4 = directory(4, &["orders:read", "orders:write"], "orders-v2");
        let d = text(&c.get("orders", &me, &"cert1".into(), &dir4).await.unwrap());
        assert_ne!(b, d);
        assert_eq!(c.source.calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_new_certificate_gets_a_new_token() {
        let (c, _clock) = cache(Duration::from_secs(600));
        let me = id("frontend");
        let dir = directory(1, &["orders:read"], "orders");
        let a = text(&c.get("orders", &me, &"cert1".into(), &dir).await.unwrap());
        let b = text(&c.get("orders", &me, &"cert2".into(), &dir).await.unwrap());
        assert_ne!(a, b);
        assert!(b.contains("cert2"), "bound to the new certificate: {b}");
    }

    #[tokio::test]
    async fn a_slow_fetch_for_one_service_does_not_delay_another_and_bursts_share_one() {
        let (c, _clock) = cache(Duration::from_secs(600));
        let me = id("frontend");
        let dir = Arc::new(directory(1, &["orders:read"], "orders"));
        let slow = {
            let (c, me, dir) = (c.clone(), me.clone(), dir.clone());
            tokio::spawn(async move { c.get("slow", &me, &"cert1".into(), &dir).await })
        };
        settle().await;
        // The slow fetch is in flight: orders is served meanwhile, ten calls with one fetch.
        let mut burst = Vec::new();
        for _ in 0..10 {
            let (c, me, dir) = (c.clone(), me.clone(), dir.clone());
            burst.push(tokio::spawn(async move {
                c.get("orders", &me, &"cert1".into(), &dir).await
            }));
        }
        for b in burst {
            assert!(b.await.unwrap().is_ok());
        }
        assert!(!slow.is_finished());
        assert_eq!(
            c.source.calls.load(Ordering::SeqCst),
            2,
            "slow + one for orders"
        );
        c.source.release_slow.notify_waiters();
        assert!(slow.await.unwrap().is_ok());
    }
}
