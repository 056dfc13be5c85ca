//! The sidecar's identity over its life: obtain (attest), renew at half-life with jitter and
//! capped backoff, re-attest if the SVID expired while the CA was away, and reload files that
//! outside tooling (cert-manager, a Secret's symlink swap) replaced in the cert directory.
//!
//! The private key is generated here and never leaves the pod. Every new identity is published
//! in one place, [`Identity::publish`]: the `CertSlot` that every new TLS handshake reads (open
//! connections keep theirs) and a watch channel for whoever must react (the token cache, whose
//! tokens are bound to the certificate).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use meshid_proto::bundle::cert_sha256;
use meshid_proto::dir_watch::DirWatch;
use meshid_proto::tls::CertSlot;
use meshid_proto::verify::{PeerRule, SpiffeVerifier, TrustSource};
use meshid_proto::{Clock, Secret, TrustBundle, TrustDomain};
use rustls_pki_types::UnixTime;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::control::Control;
use super::metrics::Metrics;
use crate::identity::backoff::{Backoff, jitter};
use crate::identity::client::{Attestation, CaClient};
use crate::identity::{Svid, files};

/// How the sidecar proves itself to the CA, read again at every attestation (a projected
/// Kubernetes token is rotated by the kubelet).
#[derive(Debug, Clone)]
pub enum AttestSource {
    JoinToken(Secret),
    K8sTokenFile(PathBuf),
}

impl AttestSource {
    /// The proof to send now (a token file is read again each time, off the runtime thread).
    pub async fn attestation(&self) -> Result<Attestation, String> {
        match self {
            Self::JoinToken(t) => Ok(Attestation::JoinToken(t.clone())),
            Self::K8sTokenFile(p) => tokio::fs::read_to_string(p)
                .await
                .map(|t| Attestation::K8sToken(Secret::new(t.trim())))
                .map_err(|e| format!("reading {}: {e}", p.display())),
        }
    }
}

/// An SVID in use, with what the data path needs of it precomputed.
pub struct Current {
    pub svid: Svid,
    /// When this SVID came into use (the renewal schedule counts from here, not from the
    /// backdated notBefore).
    pub since: SystemTime,
    /// RFC 8705 thumbprint of the leaf: the binding of every token minted for it.
    pub x5t: String,
    /// The SVID as rustls uses it. Connections that carry tokens are made with exactly this
    /// key (not whatever is current when they dial), so token and certificate always match.
    pub key: Arc<rustls::sign::CertifiedKey>,
}

pub struct Identity {
    pub slot: Arc<CertSlot>,
    current: watch::Sender<Arc<Current>>,
    cert_dir: PathBuf,
    metrics: Arc<Metrics>,
    /// The one clock of the identity and token code (tests move it instead of sleeping).
    pub clock: Arc<dyn Clock>,
}

fn current(svid: Svid, key: Arc<rustls::sign::CertifiedKey>, now: SystemTime) -> Arc<Current> {
    let x5t = meshid_proto::token::x5t_s256(&svid.chain[0]);
    Arc::new(Current {
        svid,
        since: now,
        x5t,
        key,
    })
}

impl Identity {
    /// Start with `svid` (already checked).
    pub fn new(
        svid: Svid,
        cert_dir: PathBuf,
        metrics: Arc<Metrics>,
        clock: Arc<dyn Clock>,
    ) -> Result<Arc<Self>, String> {
        let key = svid.certified_key()?;
        let slot = CertSlot::new(key.clone());
        metrics.svid_expiry_unix.store(
            meshid_proto::clock::unix_seconds(svid.not_after),
            Ordering::Relaxed,
        );
        let (current, _) = watch::channel(current(svid, key, clock.now()));
        Ok(Arc::new(Self {
            slot,
            current,
            cert_dir,
            metrics,
            clock,
        }))
    }

    pub fn current(&self) -> Arc<Current> {
        self.current.borrow().clone()
    }

    pub fn watch(&self) -> watch::Receiver<Arc<Current>> {
        self.current.subscribe()
    }

    /// Make `svid` the identity of every new connection.
    fn publish(&self, svid: Svid) -> Result<(), String> {
        let ck = svid.certified_key()?;
        self.slot.replace(ck.clone());
        self.metrics.svid_expiry_unix.store(
            meshid_proto::clock::unix_seconds(svid.not_after),
            Ordering::Relaxed,
        );
        info!(spiffe_id = %svid.spiffe_id, expires = %humantime::format_rfc3339_seconds(svid.not_after), "new SVID in use");
        self.current
            .send_replace(current(svid, ck, self.clock.now()));
        Ok(())
    }
}

/// The SVID from a previous run, if the cert directory holds a valid one (a restarted sidecar
/// does not need to attest again).
pub fn from_disk(dir: &Path, td: &TrustDomain, ca: &CaClient) -> Option<Svid> {
    let svid = files::read(dir, td.clone()).ok()?;
    check(&svid, &ca.trust(), ca.trust_domain(), UnixTime::now()).ok()?;
    Some(svid)
}

/// An SVID is usable when its chain verifies against the trust bundle at `now`.
fn check(
    svid: &Svid,
    trust: &Arc<TrustSource>,
    td: &TrustDomain,
    now: UnixTime,
) -> Result<(), String> {
    let verifier = SpiffeVerifier::new(trust.clone(), PeerRule::InTrustDomain(td.clone()));
    verifier
        .verify_chain(
            &svid.chain[0],
            &svid.chain[1..],
            now,
            webpki::KeyUsage::client_auth(),
        )
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// The reload path's decision on certificate files replaced from outside: `Ok(None)` for the
/// sidecar's own write, `Ok(Some)` for an SVID to put in force (its chain verifies against
/// the bundle in force at `now` and it names the identity in force), or why it is refused.
pub fn judge_replaced(
    read: Svid,
    current: &Svid,
    trust: &Arc<TrustSource>,
    td: &TrustDomain,
    now: UnixTime,
) -> Result<Option<Svid>, String> {
    if read.chain[0] == current.chain[0] {
        return Ok(None);
    }
    check(&read, trust, td, now)?;
    if read.spiffe_id != current.spiffe_id {
        return Err(format!(
            "it names {}, not {}",
            read.spiffe_id, current.spiffe_id
        ));
    }
    Ok(Some(read))
}

/// Attest until it works (or `shutdown`), with capped backoff.
pub async fn obtain(
    ca: &CaClient,
    source: &AttestSource,
    shutdown: &CancellationToken,
) -> Option<Svid> {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
    loop {
        let result = match source.attestation().await {
            Ok(a) => ca.issue(&a).await.map_err(|e| e.to_string()),
            Err(e) => Err(e),
        };
        let wait = backoff.next_delay();
        match result {
            Ok(svid) => return Some(svid),
            Err(e) => warn!("attestation failed, retrying in {wait:?}: {e}"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// When to renew an SVID that came into use at `since` and expires at `not_after`: half-way
/// through the life left then, minus up to 20 % (`spread` in 0..=1 picks where in that
/// window, so a fleet does not renew in lockstep); never sooner than a second after `now`.
pub fn renew_at(
    since: SystemTime,
    not_after: SystemTime,
    now: SystemTime,
    spread: f64,
) -> SystemTime {
    let left = not_after.duration_since(since).unwrap_or_default();
    let at = since + (left / 2).mul_f64(0.8 + 0.2 * spread.clamp(0.0, 1.0));
    at.max(now + Duration::from_secs(1))
}

/// How long to wait between renewal tries: capped backoff, never more than an eighth of the
/// life left (so a short-lived SVID is retried often enough to be renewed before it expires).
pub fn retry_cap(left: Duration) -> Duration {
    (left / 8).clamp(Duration::from_secs(1), Duration::from_secs(30))
}

fn random_spread() -> f64 {
    (jitter(Duration::from_secs(1000)).as_secs_f64() / 1000.0 - 0.75) * 2.0
}

/// What the trust bundle in force asks of the SVID in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Asked {
    Nothing,
    /// Its issuer no longer signs (a rotation activated a new intermediate): renew within the
    /// window. Named by the issuer's SHA-256, so one request is answered once.
    Renew([u8; 32], Duration),
    /// Its chain does not verify against the bundle (the root it chains to is gone): only a
    /// new attestation can bring an SVID the mesh trusts.
    Attest,
}

/// Whether the directory revokes this SVID's own certificate (not its identity: attesting
/// again then brings a new key and a new serial, which is what revoking a leaked key is for).
fn certificate_revoked(svid: &Svid, control: &Control) -> bool {
    let Some(dir) = control.directory.load_full() else {
        return false;
    };
    if dir.revoked().serials.is_empty() {
        return false;
    }
    meshid_proto::svid::inspect(&svid.chain[0]).is_ok_and(|info| {
        dir.revoked().refuses(&info.spiffe_id, &info.serial) == Some(CERTIFICATE_REVOKED)
    })
}

fn asked(svid: &Svid, ca: &CaClient, bundle: Option<&TrustBundle>, control: &Control) -> Asked {
    if check(svid, &ca.trust(), ca.trust_domain(), UnixTime::now()).is_err()
        || certificate_revoked(svid, control)
    {
        return Asked::Attest;
    }
    let Some(bundle) = bundle else {
        return Asked::Nothing;
    };
    match svid.chain.get(1).map(|issuer| cert_sha256(issuer)) {
        Some(issuer) if bundle.rotation.renew_issuers.contains(&issuer) => {
            Asked::Renew(issuer, bundle.rotation.renew_window)
        }
        _ => Asked::Nothing,
    }
}

/// Renew for as long as the sidecar runs: at the scheduled time, or sooner when a rotation
/// asks (the bundle names this SVID's issuer as one that no longer signs: at a random moment
/// within the window it gives, so a fleet does not stampede the CA). On failure keep the
/// current SVID and retry with capped backoff. Attest again instead when the SVID expired
/// meanwhile, when its chain no longer verifies against the bundle, or when the CA refuses the
/// certificate (a root recovery replaced what it chains to).
pub async fn renew_forever(
    identity: Arc<Identity>,
    ca: CaClient,
    source: AttestSource,
    control: Arc<Control>,
    shutdown: CancellationToken,
) {
    let mut bundles = control.watch_bundle();
    let mut directories = control.watch_directory();
    // The renewal a rotation asked for: whose issuer, and when it is due.
    // Keyed by the window too: a taint shortens it, and the renewal moves forward.
    let mut requested: Option<([u8; 32], Duration, SystemTime)> = None;
    // Where in its window this SVID renews: drawn once per SVID, so wake-ups (a reconnected
    // stream, a new bundle) do not draw again and pull renewals forward.
    let mut spread: Option<(String, f64)> = None;
    // When to attest again for an SVID that no longer verifies, and the backoff between such
    // attestations (an attestation whose SVID does not verify either, as with a clock far
    // behind the CA's, must not loop).
    let mut attest_at: Option<SystemTime> = None;
    let mut attest_backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    loop {
        let now = identity.clock.now();
        let current = identity.current();
        let bundle = bundles.borrow_and_update().clone();
        let ask = asked(&current.svid, &ca, bundle.as_deref(), &control);
        let spread_now = match &spread {
            Some((x5t, s)) if *x5t == current.x5t => *s,
            _ => {
                let s = random_spread();
                spread = Some((current.x5t.clone(), s));
                s
            }
        };
        let scheduled = renew_at(current.since, current.svid.not_after, now, spread_now);
        if ask != Asked::Attest {
            attest_at = None;
            attest_backoff.reset();
        }
        let due = match ask {
            Asked::Nothing => {
                requested = None;
                scheduled
            }
            Asked::Attest => *attest_at.get_or_insert_with(|| {
                // A fleet that lost its root attests again spread over a few seconds.
                let at = now + jitter_within(ATTEST_SPREAD);
                warn!(
                    "the SVID in use cannot serve any more (its chain does not verify against the trust bundle, or its certificate is revoked); attesting again in {:?}",
                    at.duration_since(now).unwrap_or_default()
                );
                at
            }),
            Asked::Renew(issuer, window) => {
                let at = match requested {
                    Some((asked_for, w, at)) if asked_for == issuer && w == window => at,
                    earlier => {
                        let mut at = now + jitter_within(window);
                        if let Some((asked_for, _, before)) = earlier
                            && asked_for == issuer
                        {
                            at = at.min(before);
                        }
                        info!(
                            "the CA rotated its intermediate: renewing within {window:?}, in {:?}",
                            at.duration_since(now).unwrap_or_default()
                        );
                        requested = Some((issuer, window, at));
                        at
                    }
                };
                at.min(scheduled)
            }
        };
        let wait = due.duration_since(now).unwrap_or_default();
        if !wait.is_zero() {
            let slept_from = std::time::Instant::now();
            tokio::select! {
                _ = shutdown.cancelled() => return,
                // Timers run on the monotonic clock, certificates expire on the wall clock: a
                // wall clock stepped (NTP, a resumed VM) is noticed within CLOCK_RECHECK, and
                // the schedule is decided again.
                _ = tokio::time::sleep(wait.min(CLOCK_RECHECK)) => {
                    note_clock_step(&identity, now, slept_from.elapsed());
                    if wait > CLOCK_RECHECK {
                        continue;
                    }
                }
                // A reload from disk replaced the SVID: recompute the schedule.
                _ = async { let mut w = identity.watch(); let _ = w.changed().await; } => continue,
                // A new bundle may ask for a renewal (a rotation) or take away our root.
                _ = async {
                    if bundles.changed().await.is_err() {
                        std::future::pending::<()>().await;
                    }
                } => continue,
                // A new directory may revoke our own certificate.
                _ = async {
                    if directories.changed().await.is_err() {
                        std::future::pending::<()>().await;
                    }
                } => continue,
            }
        }
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        let mut refused_certificate = false;
        loop {
            let svid = identity.current().svid.clone();
            let attest = refused_certificate
                || svid.not_after <= identity.clock.now()
                || check(&svid, &ca.trust(), ca.trust_domain(), UnixTime::now()).is_err()
                || certificate_revoked(&svid, &control);
            let result = if attest {
                if svid.not_after <= identity.clock.now() {
                    warn!("SVID expired while the CA was unreachable; attesting again");
                }
                match source.attestation().await {
                    Ok(a) => ca.issue(&a).await.map_err(|e| e.to_string()),
                    Err(e) => Err(e),
                }
            } else {
                ca.renew(&svid).await.map_err(|e| {
                    if e.refuses_certificate() {
                        warn!("the CA refuses the SVID in use ({e}); attesting again");
                        refused_certificate = true;
                    }
                    e.to_string()
                })
            };
            match result {
                Ok(next) => {
                    identity.metrics.renewals.fetch_add(1, Ordering::Relaxed);
                    requested = None;
                    if check(&next, &ca.trust(), ca.trust_domain(), UnixTime::now()).is_err() {
                        let wait = attest_backoff.next_delay();
                        warn!(
                            "the new SVID does not verify against the trust bundle either (is this host's clock right?); attesting again in {wait:?}"
                        );
                        attest_at = Some(identity.clock.now() + wait);
                    }
                    // In use first, then on disk: the file watcher then sees nothing new.
                    let on_disk = next.clone();
                    if let Err(e) = identity.publish(next) {
                        warn!("renewed SVID unusable: {e}");
                    } else {
                        // Three fsyncs: off the runtime thread, which may be the only one
                        // carrying traffic (--workers 1).
                        let dir = identity.cert_dir.clone();
                        let written =
                            tokio::task::spawn_blocking(move || files::write(&dir, &on_disk))
                                .await
                                .map_err(|e| e.to_string())
                                .and_then(|w| w.map_err(|e| e.to_string()));
                        if let Err(e) = written {
                            identity
                                .metrics
                                .svid_write_failures
                                .fetch_add(1, Ordering::Relaxed);
                            warn!(
                                "the renewed SVID is in use but not on disk ({e}); the next renewal writes it again"
                            );
                        }
                    }
                    break;
                }
                Err(e) => {
                    identity
                        .metrics
                        .renewal_failures
                        .fetch_add(1, Ordering::Relaxed);
                    let left = identity
                        .current()
                        .svid
                        .not_after
                        .duration_since(identity.clock.now())
                        .unwrap_or_default();
                    backoff.cap(retry_cap(left));
                    let wait = backoff.next_delay();
                    if refused_certificate && !attest {
                        // Attest right away rather than after a backoff.
                        continue;
                    }
                    // After a failed attestation, try renewing again next time (a spent
                    // single-use join token must not end renewals for good).
                    if attest {
                        refused_certificate = false;
                    }
                    warn!(
                        expires_in_seconds = left.as_secs(),
                        "renewal failed, keeping the current SVID (it expires in {}s); retrying in {wait:?}: {e}",
                        left.as_secs()
                    );
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    }
}

/// What the deny list says of a revoked certificate ([`meshid_proto::directory::Revoked`]).
const CERTIFICATE_REVOKED: &str = "its certificate is revoked";

/// How far apart a fleet's attestations are spread when their root goes away.
const ATTEST_SPREAD: Duration = Duration::from_secs(3);

/// How often a renewal that is not due yet looks at the wall clock again.
const CLOCK_RECHECK: Duration = Duration::from_secs(5);
/// A wall clock that moved this much more (or less) than the monotonic one was stepped.
const CLOCK_STEP: Duration = Duration::from_secs(30);

/// Say so when the wall clock moved unlike the monotonic one while the renewal slept for
/// `slept` since the wall clock read `then`.
fn note_clock_step(identity: &Identity, then: SystemTime, slept: Duration) {
    let now = identity.clock.now();
    let (ahead, by) = match now.duration_since(then) {
        Ok(wall) if wall > slept => (true, wall - slept),
        Ok(wall) => (false, slept - wall),
        Err(e) => (false, e.duration() + slept),
    };
    if by >= CLOCK_STEP {
        identity.metrics.clock_steps.fetch_add(1, Ordering::Relaxed);
        warn!(
            seconds = by.as_secs(),
            "the wall clock stepped {} by {} s; the renewal schedule is decided again",
            if ahead { "forward" } else { "back" },
            by.as_secs()
        );
    }
}

/// A random delay in `0..window` (all of it, unlike the renewal schedule's spread).
fn jitter_within(window: Duration) -> Duration {
    if window.is_zero() {
        return Duration::ZERO;
    }
    let mut b = [0u8; 8];
    aws_lc_rs::rand::fill(&mut b).expect("the system random source works");
    window.mul_f64(u64::from_le_bytes(b) as f64 / u64::MAX as f64)
}

/// Reload the cert directory when files in it are replaced from outside. A bad or mismatched
/// file is refused with a log line, and the identity in force stays.
pub fn watch_files(
    identity: Arc<Identity>,
    ca: CaClient,
    td: TrustDomain,
    shutdown: CancellationToken,
) {
    let mut changes = DirWatch::new(&identity.cert_dir, "replaced certificate files");
    tokio::spawn(async move {
        // File reads run off the runtime thread, which may be the only one carrying traffic.
        let read_dir = |dir: PathBuf, td: TrustDomain| async move {
            tokio::task::spawn_blocking(move || {
                (
                    fingerprint(&dir),
                    files::read(&dir, td).map_err(|e| e.to_string()),
                )
            })
            .await
            .unwrap_or_else(|e| (Vec::new(), Err(format!("reading the cert directory: {e}"))))
        };
        let mut seen = read_dir(identity.cert_dir.clone(), td.clone()).await.0;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = changes.changed() => {}
            }
            let (now, read) = read_dir(identity.cert_dir.clone(), td.clone()).await;
            if now == seen {
                continue;
            }
            seen = now;
            let verdict = read.and_then(|svid| {
                judge_replaced(
                    svid,
                    &identity.current().svid,
                    &ca.trust(),
                    &td,
                    UnixTime::now(),
                )
            });
            match verdict.and_then(|svid| svid.map(|s| identity.publish(s)).transpose()) {
                Ok(None) => {}
                Ok(Some(())) => {
                    identity.metrics.reloads.fetch_add(1, Ordering::Relaxed);
                    info!("certificate replaced on disk is now in use");
                }
                Err(e) => {
                    identity
                        .metrics
                        .reload_refusals
                        .fetch_add(1, Ordering::Relaxed);
                    warn!(
                        "replaced certificate files refused, the current SVID stays in force: {e}"
                    );
                }
            }
        }
    });
}

/// What the cert directory holds now, cheaply comparable.
fn fingerprint(dir: &Path) -> Vec<u8> {
    let mut all = Vec::new();
    for name in [files::SVID_FILE, files::KEY_FILE] {
        all.extend(std::fs::read(dir.join(name)).unwrap_or_default());
        all.push(0);
    }
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &all)
        .as_ref()
        .to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + s)
    }

    #[test]
    fn renewal_is_due_half_way_through_the_life_left_minus_up_to_a_fifth() {
        // A 1 h SVID that came into use at 0.
        let (since, not_after) = (at(0), at(3600));
        assert_eq!(renew_at(since, not_after, at(0), 1.0), at(1800));
        assert_eq!(renew_at(since, not_after, at(0), 0.0), at(1440));
        let mid = renew_at(since, not_after, at(0), 0.5);
        assert!(mid > at(1440) && mid < at(1800));
        // A restart half-way: the schedule counts from when the SVID came into use here.
        assert_eq!(renew_at(at(1800), not_after, at(1800), 1.0), at(2700));
    }

    #[test]
    fn an_overdue_renewal_is_tried_a_second_from_now() {
        assert_eq!(renew_at(at(0), at(60), at(100), 1.0), at(101));
    }

    #[test]
    fn retries_are_at_most_an_eighth_of_the_life_left() {
        assert_eq!(
            retry_cap(Duration::from_secs(3600)),
            Duration::from_secs(30)
        );
        assert_eq!(retry_cap(Duration::from_secs(80)), Duration::from_secs(10));
        assert_eq!(retry_cap(Duration::from_secs(2)), Duration::from_secs(1));
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        for _ in 0..10 {
            b.next_delay();
        }
        b.cap(retry_cap(Duration::from_secs(40)));
        assert_eq!(b.step(), Duration::from_secs(5));
    }
}
