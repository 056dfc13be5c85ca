//! Rotating the CA's keys without a failed request, as SPIRE does: every X.509 authority (a
//! root and the intermediate that signs leaves) and every token-signing key goes prepared ->
//! active -> old -> retired, in the store.
//!
//! - prepare: a new key; its root joins the bundle (its `kid` the JWKS) before it signs, and
//!   every sidecar learns it on its bundle stream and acknowledges it (`AckBundle`).
//! - activate: the new key signs. For a new root this waits until every connected sidecar has
//!   acknowledged a bundle holding it, so nobody meets a chain they cannot verify. The bundle
//!   then names the old intermediates, and sidecars holding an SVID they signed renew at a
//!   random moment within the renewal window.
//! - retire: the old root leaves the bundle (the old key the JWKS), refused while an SVID it
//!   signed may still be in use (the CA keeps the serials it issued until they expire or are
//!   renewed), while a connected sidecar has not acknowledged the active root, or while a
//!   token the old key signed may still be valid. `--force` overrides, loudly.
//!
//! The schedule ([`CaCore::auto_rotate`]) takes the same steps with no operator: prepare at half
//! of the active key's life, activate a sixth before its end, retire when safe.

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use meshid_proto::bundle::{RotationHints, cert_sha256};
use meshid_proto::clock::unix_seconds;
use meshid_proto::directory::Revoked;
use meshid_proto::{SpiffeId, TrustBundle};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::audit::AuditRecord;
use crate::authority::{Authorities, BACKDATE, X509Authority};
use crate::ca::CaCore;
use crate::store::{
    AuthorityRecord, IssuedRecord, KeyState, ReplicaRecord, RevocationRecord, RevokedKind,
};
use crate::token::{TokenKey, TokenKeys};

/// Sidecars holding an SVID of a tainted authority renew within this window.
const TAINT_RENEW_WINDOW: Duration = Duration::from_secs(5);
/// How often the schedule looks at the keys.
const SCHEDULE_TICK: Duration = Duration::from_secs(1);
/// How often the record of issued serials is saved when it changed.
const ISSUED_FLUSH: Duration = Duration::from_secs(2);
/// A store that cannot tell of changes (the data directory) is read again this often.
const POLL: Duration = Duration::from_secs(2);
/// A store that tells of changes (a watch) is read again this often besides.
const RESYNC: Duration = Duration::from_secs(30);
/// A replica saves its record at least this often, so the others know it is alive.
const HEARTBEAT: Duration = Duration::from_secs(20);
/// How often the schedule tries again a retire that had to wait.
const RETIRE_RETRY: Duration = Duration::from_secs(5);
/// The rotation lease: a replica that has not renewed it for this long loses it.
pub const LEASE_TTL: Duration = Duration::from_secs(15);
/// Holders named per authority in `status`.
const HOLDERS_SHOWN: usize = 20;

/// What a rotation step acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum What {
    Root,
    Intermediate,
    TokenKey,
}

impl What {
    pub fn parse(s: &str) -> Result<Self, RotateError> {
        match s {
            "root" => Ok(Self::Root),
            "intermediate" => Ok(Self::Intermediate),
            "token-key" => Ok(Self::TokenKey),
            other => Err(RotateError::Invalid(format!(
                "--what {other:?}: use root, intermediate or token-key"
            ))),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Root => "root",
            Self::Intermediate => "intermediate",
            Self::TokenKey => "token-key",
        }
    }
}

/// A rotation step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Prepare,
    Activate,
    Retire,
    /// For an expired authority: a new one, active at once, the expired one retired.
    Recover,
}

impl Step {
    pub fn parse(s: &str) -> Result<Self, RotateError> {
        match s {
            "prepare" => Ok(Self::Prepare),
            "activate" => Ok(Self::Activate),
            "retire" => Ok(Self::Retire),
            "recover" => Ok(Self::Recover),
            other => Err(RotateError::Invalid(format!(
                "unknown step {other:?}: use prepare, activate, retire or recover"
            ))),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Prepare => "prepare",
            Self::Activate => "activate",
            Self::Retire => "retire",
            Self::Recover => "recover",
        }
    }
}

/// What a step changed and what the next one waits for.
#[derive(Debug, Clone, Serialize)]
pub struct StepReport {
    pub step: &'static str,
    pub what: &'static str,
    pub changed: Vec<String>,
    pub waiting_for: Vec<String>,
    pub forced: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum RotateError {
    /// Not safe now; `waiting_for` says what must happen first.
    #[error("{reason}")]
    Refused {
        reason: String,
        waiting_for: Vec<String>,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Internal(String),
    /// Another replica changed the keys since they were read: read again, decide again.
    #[error("{0}")]
    Conflict(String),
}

fn internal(e: impl std::fmt::Display) -> RotateError {
    RotateError::Internal(e.to_string())
}

fn store_failed(e: crate::store::StoreError) -> RotateError {
    if e.is_conflict() {
        RotateError::Conflict(e.to_string())
    } else {
        RotateError::Internal(e.to_string())
    }
}

/// A step that lost a race to another replica is read and decided again this many times.
const CONFLICT_ATTEMPTS: usize = 5;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn short_sha(der: &[u8]) -> String {
    hex(&cert_sha256(der)[..8])
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// The SVIDs issued that may still be in use: inserted on issuance, removed when the holder
/// renews it (it presents it) or when it expires.
///
/// With several replicas, each saves what it issued ([`ReplicaRecord`]), and reads what the
/// others issued and saw renewed: the live set is every replica's issued less every replica's
/// renewed.
#[derive(Default)]
pub struct Issued {
    /// Issued by this replica.
    by_serial: HashMap<String, IssuedRecord>,
    /// Issued by another replica and renewed here: no longer live, whatever its record says.
    renewed: HashMap<String, IssuedRecord>,
    /// Issued by other replicas and not renewed anywhere, as last read.
    others: HashMap<String, IssuedRecord>,
    /// The other replicas' records as last read: (name, authorities, token keys, saved at).
    peers: Vec<(String, String, String, i64)>,
    dirty: bool,
    /// What this replica's record last said, and when it was saved.
    written: Option<(String, String, Instant)>,
}

impl Issued {
    fn prune(&mut self, now: SystemTime) {
        let now = unix_seconds(now);
        let before = self.by_serial.len() + self.renewed.len();
        self.by_serial.retain(|_, r| r.not_after > now);
        self.renewed.retain(|_, r| r.not_after > now);
        self.others.retain(|_, r| r.not_after > now);
        self.dirty |= self.by_serial.len() + self.renewed.len() != before;
    }

    /// Every SVID that may be in use, whichever replica issued it.
    fn all(&self) -> impl Iterator<Item = &IssuedRecord> {
        self.by_serial.values().chain(self.others.values())
    }

    fn renew(&mut self, serial: &str) {
        if self.by_serial.remove(serial).is_some() {
            self.dirty = true;
        } else if let Some(r) = self.others.remove(serial) {
            self.renewed.insert(serial.to_owned(), r);
            self.dirty = true;
        }
    }

    /// Forget every SVID under `ids` (a forced retire).
    fn forget_under(&mut self, ids: &[String]) {
        self.by_serial.retain(|_, r| !ids.contains(&r.authority));
        let gone: Vec<String> = self
            .others
            .values()
            .filter(|r| ids.contains(&r.authority))
            .map(|r| r.serial.clone())
            .collect();
        for serial in gone {
            self.renew(&serial);
        }
        self.dirty = true;
    }

    /// What the other replicas saved: their issued, less what any replica saw renewed.
    fn merge_others(&mut self, me: &str, replicas: &[ReplicaRecord]) {
        let renewed: std::collections::HashSet<&str> = replicas
            .iter()
            .flat_map(|r| r.renewed.iter().map(|i| i.serial.as_str()))
            .chain(self.renewed.keys().map(String::as_str))
            .collect();
        let others: HashMap<String, IssuedRecord> = replicas
            .iter()
            .filter(|r| r.replica != me)
            .flat_map(|r| r.issued.iter())
            .filter(|i| !renewed.contains(i.serial.as_str()))
            .map(|i| (i.serial.clone(), i.clone()))
            .collect();
        self.peers = replicas
            .iter()
            .filter(|r| r.replica != me && r.replica != "issued.json")
            .map(|r| {
                (
                    r.replica.clone(),
                    r.authorities.clone(),
                    r.token_keys.clone(),
                    r.updated_at,
                )
            })
            .collect();
        // Renewed here, issued by a replica that has not read that yet: keep ours.
        for serial in replicas
            .iter()
            .flat_map(|r| r.renewed.iter().map(|i| i.serial.as_str()))
        {
            self.by_serial.remove(serial);
        }
        self.others = others;
    }

    fn live_under(&self, authority: &str, now: SystemTime) -> Vec<&IssuedRecord> {
        let now = unix_seconds(now);
        let mut live: Vec<_> = self
            .all()
            .filter(|r| r.authority == authority && r.not_after > now)
            .collect();
        live.sort_by(|a, b| (&a.spiffe_id, a.not_after).cmp(&(&b.spiffe_id, b.not_after)));
        live
    }
}

/// A sidecar connected by a `WatchBundle` stream, and the roots it said it trusts.
struct Watcher {
    peer: SocketAddr,
    spiffe_id: String,
    acked: Vec<[u8; 32]>,
    /// When its stream opened.
    since: Instant,
}

/// How long a connected sidecar may take to acknowledge a bundle before it stops holding a
/// rotation step: a sidecar that never acknowledges (an old version, or a workload that opens
/// streams to stall the rotation) is named, and then passed over.
pub const ACK_DEADLINE: Duration = Duration::from_secs(60);

#[derive(Default)]
struct Watchers {
    next: u64,
    by_id: HashMap<u64, Watcher>,
}

/// Removes its sidecar from the connected set when its bundle stream ends.
pub struct WatcherGuard {
    watchers: Arc<Mutex<Watchers>>,
    id: u64,
}

impl Drop for WatcherGuard {
    fn drop(&mut self) {
        lock(&self.watchers).by_id.remove(&self.id);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The rotation state the CA keeps besides the keys themselves.
pub struct RotationState {
    /// One step at a time, whether from the admin endpoint or the schedule.
    step: tokio::sync::Mutex<()>,
    issued: Mutex<Issued>,
    watchers: Arc<Mutex<Watchers>>,
    /// When the bundle last changed: acknowledgements are due within [`ACK_DEADLINE`] of it.
    bundle_changed: Mutex<Instant>,
    revocations: Mutex<Vec<RevocationRecord>>,
    /// The last thing the schedule said it waits for, and when (said again once a minute).
    schedule_note: Mutex<Option<(String, Instant)>>,
    /// When the schedule tried to retire last: a retire that waits is tried again every
    /// [`RETIRE_RETRY`], not every tick (each try reads the whole store).
    retire_tried: Mutex<Option<Instant>>,
}

impl RotationState {
    /// `replicas` as the store holds them; `me` is this replica's name.
    pub fn new(me: &str, replicas: &[ReplicaRecord], revocations: Vec<RevocationRecord>) -> Self {
        let mut issued = Issued::default();
        if let Some(mine) = replicas.iter().find(|r| r.replica == me) {
            issued.by_serial = mine
                .issued
                .iter()
                .map(|r| (r.serial.clone(), r.clone()))
                .collect();
            issued.renewed = mine
                .renewed
                .iter()
                .map(|r| (r.serial.clone(), r.clone()))
                .collect();
        }
        issued.merge_others(me, replicas);
        Self {
            step: tokio::sync::Mutex::new(()),
            issued: Mutex::new(issued),
            watchers: Default::default(),
            bundle_changed: Mutex::new(Instant::now()),
            revocations: Mutex::new(revocations),
            schedule_note: Mutex::new(None),
            retire_tried: Mutex::new(None),
        }
    }

    /// The revocations as the directory carries them.
    pub fn revoked(&self) -> Revoked {
        revoked_of(&lock(&self.revocations))
    }
}

fn revoked_of(records: &[RevocationRecord]) -> Revoked {
    let mut r = Revoked::default();
    for rec in records {
        match rec.kind {
            // A hand-edited entry that does not parse is said loudly, never dropped quietly.
            RevokedKind::SpiffeId => match SpiffeId::parse(&rec.value) {
                Ok(id) => {
                    r.spiffe_ids.insert(id);
                }
                Err(e) => error!(
                    "revocations: {:?} is not a SPIFFE ID ({e}); this entry is not in force",
                    rec.value
                ),
            },
            RevokedKind::Serial => match normalize_serial(&rec.value) {
                Some(serial) => {
                    r.serials.insert(serial);
                }
                None => error!(
                    "revocations: {:?} is not a serial number; this entry is not in force",
                    rec.value
                ),
            },
        }
    }
    r
}

/// The life of an X.509 authority as rotation sees it: from its intermediate's notBefore (not
/// counting the backdating) to whichever of intermediate and root ends first.
/// A serial number as revocations record it ([`meshid_proto::directory::canonical_serial`]).
pub fn normalize_serial(value: &str) -> Option<String> {
    meshid_proto::directory::canonical_serial(value)
}

fn x509_life(a: &X509Authority) -> (SystemTime, SystemTime) {
    let start = a.intermediate_not_before + BACKDATE;
    let end = a.intermediate_not_after.min(a.root_not_after);
    (start, end.max(start))
}

/// When the schedule takes each step for a key living from `start` to `end`: prepare at half
/// its life, activate a sixth before its end (SPIRE's rule).
pub fn schedule(start: SystemTime, end: SystemTime) -> (SystemTime, SystemTime) {
    let life = end.duration_since(start).unwrap_or_default();
    (start + life / 2, end - life / 6)
}

/// A status report of every key (`meshid ca rotate status`).
#[derive(Debug, Serialize, Deserialize)]
pub struct Status {
    pub auto: bool,
    pub authorities: Vec<AuthorityStatus>,
    pub token_keys: Vec<TokenKeyStatus>,
    pub sidecars: SidecarStatus,
    pub revocations: Vec<RevocationRecord>,
    /// What the schedule does next, and when.
    pub next: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct AuthorityStatus {
    pub id: String,
    pub state: String,
    pub tainted: bool,
    pub root_sha256: String,
    pub root_expires: String,
    pub root_expires_in_seconds: i64,
    pub intermediate_sha256: String,
    pub intermediate_expires: String,
    pub intermediate_expires_in_seconds: i64,
    pub live_svids: usize,
    /// SPIFFE IDs that hold a live SVID of this authority (at most 20 named).
    pub holders: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct TokenKeyStatus {
    pub kid: String,
    pub alg: String,
    pub state: String,
    pub created: String,
    /// When the schedule wants it replaced (its life is `--token-key-ttl`).
    pub expires: String,
    pub expires_in_seconds: i64,
    /// For an old key: until when a token it signed may still be valid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_valid_until: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct SidecarStatus {
    pub connected: usize,
    /// Connected sidecars that have not acknowledged the bundle in force (`ID at ADDR`).
    pub not_acknowledged: Vec<String>,
}

impl Status {
    /// The report as a person reads it.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "automatic rotation: {}",
            if self.auto { "on" } else { "off" }
        );
        let _ = writeln!(out, "X.509 authorities:");
        for a in &self.authorities {
            let _ = writeln!(
                out,
                "  {}  {}{}  root {} (expires {}, in {}s)  intermediate {} (expires {}, in {}s)  live SVIDs: {}",
                a.id,
                a.state,
                if a.tainted { " tainted" } else { "" },
                a.root_sha256,
                a.root_expires,
                a.root_expires_in_seconds,
                a.intermediate_sha256,
                a.intermediate_expires,
                a.intermediate_expires_in_seconds,
                a.live_svids
            );
            if !a.holders.is_empty() && a.state != "active" {
                let _ = writeln!(out, "      still held by: {}", a.holders.join(", "));
            }
        }
        let _ = writeln!(out, "token-signing keys:");
        for k in &self.token_keys {
            let _ = write!(
                out,
                "  {}  {} {}  created {}  expires {} (in {}s)",
                k.kid, k.alg, k.state, k.created, k.expires, k.expires_in_seconds
            );
            if let Some(u) = &k.tokens_valid_until {
                let _ = write!(out, "  its tokens valid until {u}");
            }
            out.push('\n');
        }
        let _ = writeln!(
            out,
            "sidecars connected: {}, not yet acknowledging the bundle: {}",
            self.sidecars.connected,
            self.sidecars.not_acknowledged.len()
        );
        for s in &self.sidecars.not_acknowledged {
            let _ = writeln!(out, "  {s}");
        }
        if !self.revocations.is_empty() {
            let _ = writeln!(out, "revoked:");
            for r in &self.revocations {
                let kind = match r.kind {
                    RevokedKind::SpiffeId => "spiffe-id",
                    RevokedKind::Serial => "serial",
                };
                let _ = writeln!(out, "  {kind} {}  ({})", r.value, r.reason);
            }
        }
        for n in &self.next {
            let _ = writeln!(out, "next: {n}");
        }
        out
    }
}

impl CaCore {
    fn td(&self) -> &meshid_proto::TrustDomain {
        &self.config.trust_domain
    }

    /// Put the bundle in force now (roots of every trusted key, the rotation hints) on every
    /// bundle stream. The sequence grows with every change.
    pub(crate) fn publish_bundle(&self) {
        let authorities = self.authorities.load();
        let tokens = self.token_keys.load();
        let bundle = bundle_of(&authorities, &tokens, self.config.rotation.renew_window);
        self.bundle.send_if_modified(|current| {
            let mut next = bundle.clone();
            next.sequence = current.sequence;
            if *current == next {
                return false;
            }
            next.sequence = current.sequence + 1;
            *current = next;
            *lock(&self.rotation.bundle_changed) = Instant::now();
            true
        });
    }

    /// Remember an SVID just signed by `authority`.
    pub(crate) fn note_issued(&self, authority: &str, svid: &crate::issue::IssuedSvid) {
        let mut issued = lock(&self.rotation.issued);
        issued.by_serial.insert(
            svid.serial.clone(),
            IssuedRecord {
                serial: svid.serial.clone(),
                spiffe_id: svid.spiffe_id.to_string(),
                authority: authority.to_owned(),
                not_after: unix_seconds(svid.not_after),
            },
        );
        issued.dirty = true;
    }

    /// The SVID with `serial` was renewed: its holder no longer uses it for new connections.
    pub(crate) fn note_renewed(&self, serial: &str) {
        lock(&self.rotation.issued).renew(serial);
    }

    /// A sidecar opened a bundle stream on the connection from `peer`.
    pub fn watch_sidecar(&self, peer: SocketAddr, spiffe_id: String) -> WatcherGuard {
        let watchers = self.rotation.watchers.clone();
        let mut w = lock(&watchers);
        w.next += 1;
        let id = w.next;
        w.by_id.insert(
            id,
            Watcher {
                peer,
                spiffe_id,
                acked: Vec::new(),
                since: Instant::now(),
            },
        );
        drop(w);
        WatcherGuard { watchers, id }
    }

    /// The sidecar on the connection from `peer` trusts these roots now.
    pub fn ack_bundle(&self, peer: SocketAddr, roots: Vec<[u8; 32]>) {
        for w in lock(&self.rotation.watchers).by_id.values_mut() {
            if w.peer == peer {
                w.acked = roots.clone();
            }
        }
    }

    /// Connected sidecars that have not said they trust `root` (`ID at ADDR`), within
    /// [`ACK_DEADLINE`] of the bundle change or of their connecting.
    fn not_acknowledging(&self, root: &[u8]) -> Vec<String> {
        self.acknowledgements_missing(root, false)
    }

    /// Connected sidecars past [`ACK_DEADLINE`] that still have not said they trust `root`.
    fn never_acknowledging(&self, root: &[u8]) -> Vec<String> {
        self.acknowledgements_missing(root, true)
    }

    fn acknowledgements_missing(&self, root: &[u8], late: bool) -> Vec<String> {
        let sha = cert_sha256(root);
        let changed = *lock(&self.rotation.bundle_changed);
        let mut out: Vec<String> = lock(&self.rotation.watchers)
            .by_id
            .values()
            .filter(|w| !w.acked.contains(&sha))
            .filter(|w| (changed.max(w.since).elapsed() >= ACK_DEADLINE) == late)
            .map(|w| format!("{} at {}", w.spiffe_id, w.peer))
            .collect();
        out.sort();
        out
    }

    /// Say which sidecars a step passed over because they never acknowledged `root`.
    fn note_never_acknowledging(&self, root: &[u8], report: &mut StepReport) {
        let late = self.never_acknowledging(root);
        if !late.is_empty() {
            warn!(
                sidecars = %late.join(", "),
                "{} connected sidecar(s) did not acknowledge the trust bundle within {}s; the rotation no longer waits for them (they fail their handshakes until they follow the bundle)",
                late.len(),
                ACK_DEADLINE.as_secs()
            );
            report.changed.push(format!(
                "passed over {} sidecar(s) that did not acknowledge the bundle within {}s: {}",
                late.len(),
                ACK_DEADLINE.as_secs(),
                late.join(", ")
            ));
        }
    }

    /// Why a caller presenting `id` (and the SVID `serial`) is refused, if it is revoked.
    pub fn revoked(&self, id: &SpiffeId, serial: Option<&str>) -> Option<&'static str> {
        let dir = self.directory();
        let r = dir.revoked();
        if r.spiffe_ids.contains(id) {
            return Some("this identity is revoked");
        }
        serial
            .and_then(normalize_serial)
            .filter(|s| r.serials.contains(s))
            .map(|_| "this certificate is revoked")
    }

    /// Save the CA keys if nobody saved since this replica read them, and put them in force.
    fn save_authorities(&self, records: Vec<AuthorityRecord>) -> Result<(), RotateError> {
        let next = Authorities::new(self.td().clone(), records).map_err(internal)?;
        let mut versions = lock(&self.versions);
        let version = self
            .store
            .save_authorities(&next.records(), &versions.authorities)
            .map_err(store_failed)?;
        versions.authorities = version;
        self.authorities.store(Arc::new(next));
        drop(versions);
        // The others wait for this replica's record to name the new keys: save it soon.
        lock(&self.rotation.issued).dirty = true;
        self.publish_bundle();
        Ok(())
    }

    fn save_token_keys(&self, keys: Vec<crate::store::TokenKeyRecord>) -> Result<(), RotateError> {
        let parsed = keys
            .into_iter()
            .map(TokenKey::from_record)
            .collect::<Result<Vec<_>, _>>()
            .map_err(internal)?;
        let next = TokenKeys::new(parsed).map_err(internal)?;
        let mut versions = lock(&self.versions);
        let version = self
            .store
            .save_token_keys(&next.records(), &versions.token_keys)
            .map_err(store_failed)?;
        versions.token_keys = version;
        self.token_keys.store(Arc::new(next));
        drop(versions);
        lock(&self.rotation.issued).dirty = true;
        self.publish_bundle();
        Ok(())
    }

    async fn audit_step(&self, report: &StepReport) {
        let mut rec = AuditRecord::new("ca_rotation", report.step, self.clock.now());
        let mut reason = format!("{}: {}", report.what, report.changed.join("; "));
        if report.forced {
            reason.push_str(" (forced)");
        }
        rec.reason = Some(reason);
        self.write_audit(rec).await;
    }

    /// One rotation step, from the admin endpoint or the schedule.
    pub async fn rotate(
        &self,
        step: Step,
        what: What,
        force: bool,
    ) -> Result<StepReport, RotateError> {
        let _one_at_a_time = self.rotation.step.lock().await;
        let mut attempt = 0;
        let report = loop {
            attempt += 1;
            // Decide on what the store holds now: another replica may have stepped.
            self.sync_store_blocking().map_err(internal)?;
            match self.rotate_once(step, what, force) {
                Err(RotateError::Conflict(e)) if attempt < CONFLICT_ATTEMPTS => {
                    debug!("rotation step lost a race ({e}); reading again");
                }
                Err(RotateError::Conflict(e)) => {
                    return Err(RotateError::Internal(format!(
                        "{e}; gave up after {CONFLICT_ATTEMPTS} attempts"
                    )));
                }
                r => break r?,
            }
        };
        for c in &report.changed {
            if report.forced {
                warn!(
                    step = report.step,
                    what = report.what,
                    "CA rotation (FORCED): {c}"
                );
            } else {
                info!(step = report.step, what = report.what, "CA rotation: {c}");
            }
        }
        self.audit_step(&report).await;
        Ok(report)
    }

    fn rotate_once(&self, step: Step, what: What, force: bool) -> Result<StepReport, RotateError> {
        let now = self.clock.now();
        let mut report = StepReport {
            step: step.as_str(),
            what: what.as_str(),
            changed: Vec::new(),
            waiting_for: Vec::new(),
            forced: false,
        };
        match (step, what) {
            (Step::Prepare, What::TokenKey) => self.prepare_token_key(now, &mut report)?,
            (Step::Activate, What::TokenKey) => self.activate_token_key(now, &mut report)?,
            (Step::Retire, What::TokenKey) => self.retire_token_keys(now, force, &mut report)?,
            (Step::Prepare, _) => self.prepare_x509(what, now, &mut report)?,
            (Step::Activate, _) => self.activate_x509(what, now, force, &mut report)?,
            (Step::Retire, _) => self.retire_x509(what, now, force, &mut report)?,
            (Step::Recover, What::TokenKey) => {
                return Err(RotateError::Invalid(
                    "a token-signing key does not expire; rotate it with prepare, activate, retire"
                        .into(),
                ));
            }
            (Step::Recover, _) => self.recover_x509(what, now, force, &mut report)?,
        }
        Ok(report)
    }

    fn prepare_x509(
        &self,
        what: What,
        now: SystemTime,
        report: &mut StepReport,
    ) -> Result<(), RotateError> {
        let authorities = self.authorities.load();
        if let Some(p) = authorities
            .keys()
            .iter()
            .find(|k| k.state == KeyState::Prepared)
        {
            return Err(RotateError::Refused {
                reason: format!(
                    "authority {} is already prepared; activate it first (meshid ca rotate activate --what {})",
                    p.id,
                    kind_of(p, &authorities).as_str()
                ),
                waiting_for: vec![],
            });
        }
        let active = authorities.active().map_err(internal)?;
        let lifetimes = self.config.rotation.lifetimes;
        let new = match what {
            What::Root => {
                X509Authority::generate_with(self.td(), now, KeyState::Prepared, lifetimes)
            }
            _ => X509Authority::new_intermediate(
                self.td(),
                now,
                KeyState::Prepared,
                active.record(),
                lifetimes.intermediate,
            ),
        }
        .map_err(|e| RotateError::Invalid(e.to_string()))?;
        report.changed.push(match what {
            What::Root => format!(
                "prepared authority {}: a new root {} (expires {}) and its intermediate; the new root is in the bundle now, beside the active one",
                new.id,
                short_sha(&new.root),
                rfc3339(new.root_not_after)
            ),
            _ => format!(
                "prepared authority {}: a new intermediate {} (expires {}) under the active root",
                new.id,
                short_sha(&new.intermediate),
                rfc3339(new.intermediate_not_after)
            ),
        });
        let mut records = authorities.records();
        records.push(new.record().clone());
        let root = new.root.clone();
        self.save_authorities(records)?;
        if what == What::Root {
            report.waiting_for.push(format!(
                "activate once every connected sidecar has acknowledged the new root ({} not yet; they do within seconds)",
                self.not_acknowledging(&root).len()
            ));
        }
        Ok(())
    }

    fn activate_x509(
        &self,
        what: What,
        now: SystemTime,
        force: bool,
        report: &mut StepReport,
    ) -> Result<(), RotateError> {
        let authorities = self.authorities.load();
        let Some(prepared) = authorities
            .keys()
            .iter()
            .find(|k| k.state == KeyState::Prepared)
        else {
            return Err(RotateError::Invalid(format!(
                "no prepared authority; run meshid ca rotate prepare --what {} first",
                what.as_str()
            )));
        };
        let kind = kind_of(prepared, &authorities);
        if kind != what {
            return Err(RotateError::Invalid(format!(
                "the prepared authority {} is a new {}; say --what {}",
                prepared.id,
                kind.as_str(),
                kind.as_str()
            )));
        }
        // Every replica must have the prepared authority in force (its sidecars learn the new
        // root from it) before SVIDs under it are signed anywhere.
        let behind = self.replicas_behind(true, Step::Activate);
        if !behind.is_empty() {
            if !force {
                return Err(RotateError::Refused {
                    reason: "another CA replica has not caught up with the prepared authority yet (--force overrides)".into(),
                    waiting_for: behind,
                });
            }
            report.forced = true;
            report.changed.push(format!(
                "FORCED past {} CA replica(s) that have not caught up",
                behind.len()
            ));
        }
        if kind == What::Root {
            self.note_never_acknowledging(&prepared.root, report);
            let waiting = self.not_acknowledging(&prepared.root);
            if !waiting.is_empty() {
                if !force {
                    return Err(RotateError::Refused {
                        reason: format!(
                            "{} connected sidecar(s) have not acknowledged the new root yet; SVIDs under it would fail their handshakes (--force overrides)",
                            waiting.len()
                        ),
                        waiting_for: waiting,
                    });
                }
                report.forced = true;
                report.changed.push(format!(
                    "FORCED past {} sidecar(s) that do not trust the new root yet",
                    waiting.len()
                ));
            }
        }
        let mut records = authorities.records();
        let mut old = Vec::new();
        for r in &mut records {
            if r.id == prepared.id {
                r.state = KeyState::Active;
            } else if r.state == KeyState::Active {
                r.state = KeyState::Old;
                r.superseded_at = Some(now);
                old.push(r.id.clone());
            }
        }
        let issued = lock(&self.rotation.issued);
        let live: usize = old.iter().map(|id| issued.live_under(id, now).len()).sum();
        drop(issued);
        report.changed.push(format!(
            "authority {} signs new SVIDs; {} is old: its {} live SVID(s) renew within {}s",
            prepared.id,
            old.join(", "),
            live,
            self.config.rotation.renew_window.as_secs()
        ));
        self.save_authorities(records)?;
        report.waiting_for.push(format!(
            "retire once the SVIDs under {} have renewed (meshid ca rotate status counts them)",
            old.join(", ")
        ));
        Ok(())
    }

    /// Why retiring the old authorities `ids` is not safe now (empty: safe).
    fn x509_retire_blockers(
        &self,
        authorities: &Authorities,
        ids: &[String],
        now: SystemTime,
    ) -> Vec<String> {
        let mut blockers = Vec::new();
        let issued = lock(&self.rotation.issued);
        for id in ids {
            let live = issued.live_under(id, now);
            if live.is_empty() {
                continue;
            }
            let holders: BTreeSet<&str> = live.iter().map(|r| r.spiffe_id.as_str()).collect();
            let last = live.iter().map(|r| r.not_after).max().unwrap_or_default();
            blockers.push(format!(
                "{} live SVID(s) under authority {id} (held by {}; the last expires {} unless renewed first)",
                live.len(),
                holders.into_iter().take(HOLDERS_SHOWN).collect::<Vec<_>>().join(", "),
                rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(last.max(0) as u64))
            ));
        }
        drop(issued);
        blockers.extend(self.replicas_behind(true, Step::Retire));
        // A root that leaves the bundle: every connected sidecar must trust the active one.
        if let Ok(active) = authorities.active() {
            let roots_leave = authorities
                .keys()
                .iter()
                .filter(|k| ids.contains(&k.id))
                .any(|k| k.root != active.root);
            if roots_leave {
                for s in self.not_acknowledging(&active.root) {
                    blockers.push(format!("sidecar {s} has not acknowledged the active root"));
                }
            }
        }
        blockers
    }

    fn retire_x509(
        &self,
        what: What,
        now: SystemTime,
        force: bool,
        report: &mut StepReport,
    ) -> Result<(), RotateError> {
        let authorities = self.authorities.load();
        let active = authorities.active().map_err(internal)?;
        let ids: Vec<String> = authorities
            .keys()
            .iter()
            .filter(|k| k.state == KeyState::Old)
            .filter(|k| (k.root == active.root) == (what == What::Intermediate))
            .map(|k| k.id.clone())
            .collect();
        if ids.is_empty() {
            return Err(RotateError::Invalid(format!(
                "no old {} authority to retire",
                what.as_str()
            )));
        }
        // Each old authority on its own: one still in use does not hold back one that is not
        // (a short rotation cycle can leave several old ones at once).
        let mut safe = Vec::new();
        let mut blockers = Vec::new();
        for id in &ids {
            let b = self.x509_retire_blockers(&authorities, std::slice::from_ref(id), now);
            if b.is_empty() {
                safe.push(id.clone());
            }
            blockers.extend(b);
        }
        let mut seen = BTreeSet::new();
        blockers.retain(|b| seen.insert(b.clone()));
        let ids = if force || safe.is_empty() {
            if !blockers.is_empty() {
                if !force {
                    return Err(RotateError::Refused {
                        reason: format!(
                            "retiring {} now would break connections still using it (--force overrides)",
                            ids.join(", ")
                        ),
                        waiting_for: blockers,
                    });
                }
                report.forced = true;
                report
                    .changed
                    .push(format!("FORCED past: {}", blockers.join("; ")));
            }
            ids
        } else {
            report.waiting_for.extend(blockers);
            safe
        };
        let mut records = authorities.records();
        for r in &mut records {
            if ids.contains(&r.id) {
                r.state = KeyState::Retired;
            }
        }
        report.changed.push(match what {
            What::Root => format!(
                "retired {}: its root left the bundle (the active root is {})",
                ids.join(", "),
                short_sha(&active.root)
            ),
            _ => format!(
                "retired {}: its intermediate signs nothing more",
                ids.join(", ")
            ),
        });
        self.save_authorities(records)?;
        if force {
            lock(&self.rotation.issued).forget_under(&ids);
        }
        Ok(())
    }

    fn recover_x509(
        &self,
        what: What,
        now: SystemTime,
        force: bool,
        report: &mut StepReport,
    ) -> Result<(), RotateError> {
        let authorities = self.authorities.load();
        let active = authorities.active().map_err(internal)?;
        let expired = match what {
            What::Root => active.root_not_after <= now,
            _ => active.intermediate_not_after <= now,
        };
        if !expired && !force {
            return Err(RotateError::Invalid(format!(
                "the active {} has not expired (it does {}); rotate it with prepare, activate and retire, which costs no request, or give --force",
                what.as_str(),
                rfc3339(match what {
                    What::Root => active.root_not_after,
                    _ => active.intermediate_not_after,
                })
            )));
        }
        report.forced = force && !expired;
        let lifetimes = self.config.rotation.lifetimes;
        let new = match what {
            What::Root => X509Authority::generate_with(self.td(), now, KeyState::Active, lifetimes),
            _ => {
                if active.root_not_after <= now {
                    return Err(RotateError::Invalid(
                        "the root has expired too: recover with --what root".into(),
                    ));
                }
                X509Authority::new_intermediate(
                    self.td(),
                    now,
                    KeyState::Active,
                    active.record(),
                    lifetimes.intermediate,
                )
            }
        }
        .map_err(|e| RotateError::Invalid(e.to_string()))?;
        let mut records = authorities.records();
        let mut gone = Vec::new();
        for r in &mut records {
            if r.state != KeyState::Retired {
                gone.push(r.id.clone());
                if what == What::Root || r.state != KeyState::Active {
                    r.state = KeyState::Retired;
                } else {
                    r.state = KeyState::Old;
                    r.superseded_at = Some(now);
                }
            }
        }
        records.push(new.record().clone());
        report.changed.push(match what {
            What::Root => format!(
                "new root {} and intermediate (authority {}) active now; {} retired. Every sidecar must attest again: they do by themselves once they trust the new root (the bundle ConfigMap in Kubernetes; elsewhere copy `meshid ca bundle` to their --ca-bundle file)",
                short_sha(&new.root),
                new.id,
                gone.join(", ")
            ),
            _ => format!(
                "new intermediate {} (authority {}) under the same root active now; sidecars whose SVID expired attest again by themselves",
                short_sha(&new.intermediate),
                new.id
            ),
        });
        self.save_authorities(records)?;
        Ok(())
    }

    fn prepare_token_key(
        &self,
        now: SystemTime,
        report: &mut StepReport,
    ) -> Result<(), RotateError> {
        let keys = self.token_keys.load();
        if let Some(p) = keys.keys().iter().find(|k| k.state == KeyState::Prepared) {
            return Err(RotateError::Refused {
                reason: format!(
                    "token key {} is already prepared; activate it first (meshid ca rotate activate --what token-key)",
                    p.kid
                ),
                waiting_for: vec![],
            });
        }
        let new =
            TokenKey::generate(self.config.token_alg, KeyState::Prepared, now).map_err(internal)?;
        report.changed.push(format!(
            "prepared token key {} ({}): in the JWKS now, signing nothing yet",
            new.kid,
            new.alg.jws_name()
        ));
        let mut records = keys.records();
        records.push(new.record().clone());
        self.save_token_keys(records)?;
        report.waiting_for.push(
            "activate when you like: verifiers fetch a new kid when they first meet it".into(),
        );
        Ok(())
    }

    fn activate_token_key(
        &self,
        now: SystemTime,
        report: &mut StepReport,
    ) -> Result<(), RotateError> {
        let keys = self.token_keys.load();
        let Some(prepared) = keys.keys().iter().find(|k| k.state == KeyState::Prepared) else {
            return Err(RotateError::Invalid(
                "no prepared token key; run meshid ca rotate prepare --what token-key first".into(),
            ));
        };
        // Every replica's sidecars must have the new key in their JWKS first.
        let behind = self.replicas_behind(false, Step::Activate);
        if !behind.is_empty() {
            return Err(RotateError::Refused {
                reason: "another CA replica has not caught up with the prepared token key yet"
                    .into(),
                waiting_for: behind,
            });
        }
        let kid = prepared.kid.clone();
        let mut records = keys.records();
        let mut old = Vec::new();
        for r in &mut records {
            if r.kid == kid {
                r.state = KeyState::Active;
            } else if r.state == KeyState::Active {
                r.state = KeyState::Old;
                r.superseded_at = Some(now);
                old.push(r.kid.clone());
            }
        }
        self.save_token_keys(records)?;
        let until = now + self.config.token_ttl + BACKDATE;
        report.changed.push(format!(
            "token key {kid} signs new tokens; {} is old and stays in the JWKS",
            old.join(", ")
        ));
        report.waiting_for.push(format!(
            "retire after {}, when every token the old key signed has expired",
            rfc3339(until)
        ));
        Ok(())
    }

    fn retire_token_keys(
        &self,
        now: SystemTime,
        force: bool,
        report: &mut StepReport,
    ) -> Result<(), RotateError> {
        let keys = self.token_keys.load();
        let old: Vec<_> = keys
            .keys()
            .iter()
            .filter(|k| k.state == KeyState::Old)
            .collect();
        if old.is_empty() {
            return Err(RotateError::Invalid("no old token key to retire".into()));
        }
        let mut blockers = self.replicas_behind(false, Step::Retire);
        if !blockers.is_empty() && !force {
            return Err(RotateError::Refused {
                reason: "another CA replica has not caught up with the token-key rotation yet (--force overrides)".into(),
                waiting_for: blockers,
            });
        }
        let mut safe = Vec::new();
        for k in &old {
            let since = k.record().superseded_at.unwrap_or(now);
            let until = since + self.config.token_ttl + BACKDATE;
            if until > now {
                blockers.push(format!(
                    "tokens signed by {} may be valid until {}",
                    k.kid,
                    rfc3339(until)
                ));
            } else {
                safe.push(k.kid.clone());
            }
        }
        // Keys whose tokens have all expired go now, whatever the others wait for.
        if !safe.is_empty() && !force {
            report.waiting_for.extend(blockers);
            return self.retire_kids(&keys, safe, report);
        }
        if !blockers.is_empty() {
            if !force {
                return Err(RotateError::Refused {
                    reason: "a token the old key signed may still be in use (--force overrides)"
                        .into(),
                    waiting_for: blockers,
                });
            }
            report.forced = true;
            report
                .changed
                .push(format!("FORCED past: {}", blockers.join("; ")));
        }
        let kids: Vec<String> = old.iter().map(|k| k.kid.clone()).collect();
        self.retire_kids(&keys, kids, report)
    }

    fn retire_kids(
        &self,
        keys: &TokenKeys,
        kids: Vec<String>,
        report: &mut StepReport,
    ) -> Result<(), RotateError> {
        let mut records = keys.records();
        for r in &mut records {
            if kids.contains(&r.kid) {
                r.state = KeyState::Retired;
            }
        }
        self.save_token_keys(records)?;
        report.changed.push(format!(
            "retired token key(s) {}: out of the JWKS",
            kids.join(", ")
        ));
        Ok(())
    }

    /// Taint an old authority: every SVID it signed is renewed at once.
    pub async fn taint(&self, id: &str) -> Result<StepReport, RotateError> {
        let _one_at_a_time = self.rotation.step.lock().await;
        let mut attempt = 0;
        loop {
            attempt += 1;
            self.sync_store_blocking().map_err(internal)?;
            match self.taint_once(id) {
                Err(RotateError::Conflict(_)) if attempt < CONFLICT_ATTEMPTS => continue,
                r => break r?,
            }
        }
        let report = StepReport {
            step: "taint",
            what: "authority",
            changed: vec![format!(
                "authority {id} tainted: every SVID it signed renews within {}s",
                TAINT_RENEW_WINDOW.as_secs()
            )],
            waiting_for: vec![format!(
                "retire {id} once status shows no live SVID under it"
            )],
            forced: false,
        };
        warn!("CA rotation: {}", report.changed[0]);
        self.audit_step(&report).await;
        Ok(report)
    }

    fn taint_once(&self, id: &str) -> Result<(), RotateError> {
        let authorities = self.authorities.load();
        let Some(a) = authorities.keys().iter().find(|k| k.id == id) else {
            return Err(RotateError::Invalid(format!("no authority {id:?}")));
        };
        if a.state != KeyState::Old {
            return Err(RotateError::Invalid(format!(
                "authority {id} is {}: only an old authority can be tainted (activate a new one first, so the renewals have somewhere to go)",
                a.state.as_str()
            )));
        }
        let mut records = authorities.records();
        for r in &mut records {
            if r.id == id {
                r.tainted = true;
            }
        }
        self.save_authorities(records)
    }

    /// Revoke (or with `revoke: false`, reinstate) an identity or one SVID by serial.
    pub async fn set_revoked(
        &self,
        kind: RevokedKind,
        value: &str,
        reason: &str,
        revoke: bool,
    ) -> Result<StepReport, RotateError> {
        let _one_at_a_time = self.rotation.step.lock().await;
        let value = match kind {
            RevokedKind::SpiffeId => {
                let id = SpiffeId::parse(value)
                    .map_err(|e| RotateError::Invalid(format!("--spiffe-id {value:?}: {e}")))?;
                if id.trust_domain() != self.td() {
                    return Err(RotateError::Invalid(format!(
                        "--spiffe-id {id} is outside trust domain {}",
                        self.td()
                    )));
                }
                id.to_string()
            }
            RevokedKind::Serial => {
                normalize_serial(value).ok_or_else(|| {
                    RotateError::Invalid(format!(
                        "--serial {value:?} is not a certificate serial number in hexadecimal (as meshid inspect or openssl prints it)"
                    ))
                })?
            }
        };
        // A revocation that matches nothing known is kept (the SVID may predate this CA's
        // records) but said plainly, so a mistyped value is noticed.
        let known = match kind {
            RevokedKind::SpiffeId => {
                lock(&self.rotation.issued)
                    .all()
                    .any(|r| r.spiffe_id == value)
                    || self
                        .directory()
                        .service_by_id(&SpiffeId::parse(&value).map_err(internal)?)
                        .is_some()
            }
            RevokedKind::Serial => lock(&self.rotation.issued)
                .all()
                .any(|r| normalize_serial(&r.serial).as_deref() == Some(value.as_str())),
        };
        let mut attempt = 0;
        let (records, change) = loop {
            attempt += 1;
            self.sync_store_blocking().map_err(internal)?;
            match self.revoke_once(kind.clone(), &value, reason, revoke) {
                Err(RotateError::Conflict(_)) if attempt < CONFLICT_ATTEMPTS => continue,
                r => break r?,
            }
        };
        let revoked = revoked_of(&records);
        *lock(&self.rotation.revocations) = records;
        self.directory.send_modify(|d| {
            let mut next = (**d).clone();
            next.set_revoked(revoked);
            next.sequence += 1;
            *d = Arc::new(next);
        });
        warn!("{change}");
        let mut rec = AuditRecord::new(
            "revocation",
            if revoke { "revoked" } else { "unrevoked" },
            self.clock.now(),
        );
        match kind {
            RevokedKind::SpiffeId => rec.spiffe_id = Some(value.clone()),
            RevokedKind::Serial => rec.serial = Some(value.clone()),
        }
        rec.reason = Some(reason.to_owned());
        self.write_audit(rec).await;
        let mut changed = vec![change];
        if revoke && !known {
            changed.push(format!(
                "note: no live SVID issued by this CA {} {value}; check the value",
                match kind {
                    RevokedKind::SpiffeId => "names, and no service of the policy is,",
                    RevokedKind::Serial => "has the serial",
                }
            ));
        }
        Ok(StepReport {
            step: if revoke { "revoke" } else { "unrevoke" },
            what: match kind {
                RevokedKind::SpiffeId => "spiffe-id",
                RevokedKind::Serial => "serial",
            },
            changed,
            waiting_for: vec![],
            forced: false,
        })
    }

    /// The revocations with `value` added (or removed), saved if nobody saved since they were
    /// read; what changed.
    fn revoke_once(
        &self,
        kind: RevokedKind,
        value: &str,
        reason: &str,
        revoke: bool,
    ) -> Result<(Vec<RevocationRecord>, String), RotateError> {
        let value = value.to_owned();
        let mut records = lock(&self.rotation.revocations).clone();
        let exists = records.iter().any(|r| r.kind == kind && r.value == value);
        let change = match (revoke, exists) {
            (true, true) => format!("{value} was already revoked"),
            (false, false) => {
                return Err(RotateError::Invalid(format!("{value} is not revoked")));
            }
            (true, false) => {
                records.push(RevocationRecord {
                    kind: kind.clone(),
                    value: value.clone(),
                    revoked_at: unix_seconds(self.clock.now()),
                    reason: reason.to_owned(),
                });
                format!(
                    "revoked {value}: the CA issues, renews and grants nothing for it, and every sidecar refuses its calls once its directory arrives (seconds)"
                )
            }
            (false, true) => {
                records.retain(|r| !(r.kind == kind && r.value == value));
                format!("reinstated {value}")
            }
        };
        let mut versions = lock(&self.versions);
        versions.revocations = self
            .store
            .save_revocations(&records, &versions.revocations)
            .map_err(store_failed)?;
        Ok((records, change))
    }

    /// Every key, its state and expiry, how many live SVIDs chain to it and who holds them.
    pub fn rotation_status(&self) -> Status {
        let now = self.clock.now();
        let now_s = unix_seconds(now);
        let authorities = self.authorities.load();
        let issued = lock(&self.rotation.issued);
        let list = authorities
            .keys()
            .iter()
            .filter(|k| k.state != KeyState::Retired)
            .map(|k| {
                let live = issued.live_under(&k.id, now);
                let holders: BTreeSet<String> = live.iter().map(|r| r.spiffe_id.clone()).collect();
                AuthorityStatus {
                    id: k.id.clone(),
                    state: k.state.as_str().to_owned(),
                    tainted: k.record().tainted,
                    root_sha256: short_sha(&k.root),
                    root_expires: rfc3339(k.root_not_after),
                    root_expires_in_seconds: unix_seconds(k.root_not_after) - now_s,
                    intermediate_sha256: short_sha(&k.intermediate),
                    intermediate_expires: rfc3339(k.intermediate_not_after),
                    intermediate_expires_in_seconds: unix_seconds(k.intermediate_not_after) - now_s,
                    live_svids: live.len(),
                    holders: holders.into_iter().take(HOLDERS_SHOWN).collect(),
                }
            })
            .collect();
        drop(issued);
        let ttl = self.config.rotation.token_key_ttl;
        let token_keys = self
            .token_keys
            .load()
            .keys()
            .iter()
            .filter(|k| k.state != KeyState::Retired)
            .map(|k| {
                let r = k.record();
                TokenKeyStatus {
                    kid: k.kid.clone(),
                    alg: r.alg.clone(),
                    state: k.state.as_str().to_owned(),
                    created: rfc3339(r.created_at),
                    expires: rfc3339(r.created_at + ttl),
                    expires_in_seconds: unix_seconds(r.created_at + ttl) - now_s,
                    tokens_valid_until: r
                        .superseded_at
                        .map(|s| rfc3339(s + self.config.token_ttl + BACKDATE)),
                }
            })
            .collect();
        let (connected, not_acknowledged) = match authorities.active() {
            Ok(a) => {
                let bundle = self.bundle();
                let mut waiting = Vec::new();
                for root in &bundle.roots {
                    waiting.extend(self.not_acknowledging(root));
                }
                waiting.sort();
                waiting.dedup();
                let _ = a;
                (lock(&self.rotation.watchers).by_id.len(), waiting)
            }
            Err(_) => (lock(&self.rotation.watchers).by_id.len(), Vec::new()),
        };
        Status {
            auto: self.config.rotation.auto,
            authorities: list,
            token_keys,
            sidecars: SidecarStatus {
                connected,
                not_acknowledged,
            },
            revocations: lock(&self.rotation.revocations).clone(),
            next: self.planned(now),
        }
    }

    /// What the schedule does next, and when.
    fn planned(&self, now: SystemTime) -> Vec<String> {
        let mut next = Vec::new();
        if !self.config.rotation.auto {
            return next;
        }
        let authorities = self.authorities.load();
        if let Ok(active) = authorities.active() {
            let (start, end) = x509_life(active);
            let (prepare_at, activate_at) = schedule(start, end);
            let prepared = authorities
                .keys()
                .iter()
                .any(|k| k.state == KeyState::Prepared);
            if prepared {
                next.push(format!(
                    "activate the prepared authority at {}",
                    rfc3339(activate_at)
                ));
            } else {
                next.push(format!(
                    "prepare a new {} at {}",
                    x509_due_kind(active, prepare_at.max(now)).as_str(),
                    rfc3339(prepare_at)
                ));
            }
        }
        let tokens = self.token_keys.load();
        if let Ok(active) = tokens.active() {
            let start = active.record().created_at;
            let (prepare_at, activate_at) =
                schedule(start, start + self.config.rotation.token_key_ttl);
            if tokens.keys().iter().any(|k| k.state == KeyState::Prepared) {
                next.push(format!(
                    "activate the prepared token key at {}",
                    rfc3339(activate_at)
                ));
            } else {
                next.push(format!(
                    "prepare a new token key at {}",
                    rfc3339(prepare_at)
                ));
            }
        }
        let _ = now;
        next
    }

    /// One look at the keys by the schedule: take whatever step is due.
    pub async fn auto_rotate(&self) {
        let now = self.clock.now();
        let mut due: Vec<(Step, What)> = Vec::new();
        {
            let authorities = self.authorities.load();
            if let Ok(active) = authorities.active() {
                let (start, end) = x509_life(active);
                let (prepare_at, activate_at) = schedule(start, end);
                let prepared = authorities
                    .keys()
                    .iter()
                    .find(|k| k.state == KeyState::Prepared);
                match prepared {
                    // A brought intermediate (no root key here) belongs to the operator's
                    // PKI: the schedule never replaces it with a root of its own.
                    None if now >= prepare_at
                        && now < end
                        && active.record().root_key_pem.is_none() =>
                    {
                        self.schedule_note(format!(
                            "automatic rotation: authority {} is a brought intermediate (expires {}); bring its successor from your upstream CA",
                            active.id,
                            rfc3339(active.intermediate_not_after)
                        ))
                    }
                    None if now >= prepare_at && now < end => {
                        due.push((Step::Prepare, x509_due_kind(active, now)))
                    }
                    Some(p) if now >= activate_at => {
                        due.push((Step::Activate, kind_of(p, &authorities)))
                    }
                    _ => {}
                }
                for k in authorities
                    .keys()
                    .iter()
                    .filter(|k| k.state == KeyState::Old)
                {
                    let what = if k.root == active.root {
                        What::Intermediate
                    } else {
                        What::Root
                    };
                    if !due.contains(&(Step::Retire, what)) {
                        due.push((Step::Retire, what));
                    }
                }
            }
            let tokens = self.token_keys.load();
            if let Ok(active) = tokens.active() {
                let start = active.record().created_at;
                let (prepare_at, activate_at) =
                    schedule(start, start + self.config.rotation.token_key_ttl);
                let prepared = tokens.keys().iter().any(|k| k.state == KeyState::Prepared);
                if !prepared && now >= prepare_at {
                    due.push((Step::Prepare, What::TokenKey));
                } else if prepared && now >= activate_at {
                    due.push((Step::Activate, What::TokenKey));
                }
                if tokens.keys().iter().any(|k| k.state == KeyState::Old) {
                    due.push((Step::Retire, What::TokenKey));
                }
            }
        }
        let retire_now = {
            let mut tried = lock(&self.rotation.retire_tried);
            let now = tried.is_none_or(|t| t.elapsed() >= RETIRE_RETRY);
            if now && due.iter().any(|(s, _)| *s == Step::Retire) {
                *tried = Some(Instant::now());
            }
            now
        };
        due.retain(|(s, _)| *s != Step::Retire || retire_now);
        for (step, what) in due {
            match self.rotate(step, what, false).await {
                Ok(r) => info!(
                    "automatic rotation: {} {}: {}",
                    step.as_str(),
                    what.as_str(),
                    r.changed.join("; ")
                ),
                // Retiring waits quietly until it is safe; anything else is said once a minute.
                Err(RotateError::Refused { .. }) if step == Step::Retire => {}
                Err(e) => self.schedule_note(format!(
                    "automatic rotation: {} {} waits: {e}{}",
                    step.as_str(),
                    what.as_str(),
                    match &e {
                        RotateError::Refused { waiting_for, .. } if !waiting_for.is_empty() =>
                            format!(" ({})", waiting_for.join("; ")),
                        _ => String::new(),
                    }
                )),
            }
        }
    }

    fn schedule_note(&self, note: String) {
        let mut last = lock(&self.rotation.schedule_note);
        let repeat = last
            .as_ref()
            .is_some_and(|(n, at)| *n == note && at.elapsed() < Duration::from_secs(60));
        if !repeat {
            warn!("{note}");
            *last = Some((note, Instant::now()));
        }
    }

    /// Save this replica's record of issued serials when it changed.
    async fn flush_issued(&self) {
        let now = self.clock.now();
        let (authorities, token_keys) = {
            let v = lock(&self.versions);
            (v.authorities.0.clone(), v.token_keys.0.clone())
        };
        let snapshot = {
            let mut issued = lock(&self.rotation.issued);
            issued.prune(now);
            // Saved when it changed, when the keys in force changed (the others wait for
            // that before they retire a key), and every HEARTBEAT (they know it is alive).
            let current = issued.written.as_ref().is_some_and(|(a, t, at)| {
                *a == authorities && *t == token_keys && at.elapsed() < HEARTBEAT
            });
            if !issued.dirty && current {
                return;
            }
            issued.dirty = false;
            issued.written = Some((authorities.clone(), token_keys.clone(), Instant::now()));
            let mut record = ReplicaRecord {
                replica: self.config.replica.clone(),
                updated_at: unix_seconds(now),
                issued: issued.by_serial.values().cloned().collect(),
                renewed: issued.renewed.values().cloned().collect(),
                authorities,
                token_keys,
            };
            record.issued.sort_by(|a, b| a.serial.cmp(&b.serial));
            record.renewed.sort_by(|a, b| a.serial.cmp(&b.serial));
            record
        };
        let store = self.store.clone();
        match tokio::task::spawn_blocking(move || store.save_replica(&snapshot)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                error!("saving the issued serials: {e}");
                let mut issued = lock(&self.rotation.issued);
                issued.dirty = true;
                issued.written = None;
            }
            Err(e) => error!("saving the issued serials: {e}"),
        }
    }

    /// The replicas that have not yet put in force the keys this replica has (`x509`: the CA
    /// keys; else the token keys): until they have, they may still sign with a key this step
    /// would retire or a root some sidecars do not trust yet, and their record of what they
    /// issued is not complete. A replica silent for longer than an SVID and a token live is
    /// passed over: even one cut off from the store and still serving has nothing alive that
    /// it signed before then.
    fn replicas_behind(&self, x509: bool, step: Step) -> Vec<String> {
        let mine = {
            let v = lock(&self.versions);
            if x509 {
                v.authorities.0.clone()
            } else {
                v.token_keys.0.clone()
            }
        };
        // Activating waits for the replicas whose sidecars must trust the new key: those that
        // spoke lately (a stopped one's sidecars have moved on). Retiring waits for any that
        // may still sign with the old key.
        let silence = match step {
            Step::Retire => self.config.svid_ttl + self.config.token_ttl + BACKDATE,
            _ => HEARTBEAT * 3,
        };
        let alive_since = unix_seconds(self.clock.now()) - silence.as_secs() as i64;
        lock(&self.rotation.issued)
            .peers
            .iter()
            .filter(|p| p.3 >= alive_since && if x509 { p.1 != mine } else { p.2 != mine })
            .map(|p| {
                format!(
                    "CA replica {} has not caught up with the {} yet (a running replica does within seconds; one that stopped is passed over {}s after its last word, or --force)",
                    p.0,
                    if x509 { "CA keys" } else { "token keys" },
                    silence.as_secs()
                )
            })
            .collect()
    }

    /// Read the shared documents again and put in force what another replica changed: its
    /// keys, its rotation steps, its revocations, and what it issued. A document that does
    /// not make a CA (a hand edit gone wrong) is refused loudly, and what is in force stays.
    /// Callers hold `rotation.step`, so that no step saves between this read and its use.
    pub(crate) fn sync_store_blocking(&self) -> Result<(), crate::store::StoreError> {
        let authorities = self.store.load_authorities()?;
        let tokens = self.store.load_token_keys()?;
        let revocations = self.store.load_revocations()?;
        let replicas = self.store.load_replicas()?;
        let mut bundle_changed = false;
        {
            let mut versions = lock(&self.versions);
            // A shared document that was there and is gone was deleted by hand: what is in
            // force here stays (an empty set of revocations would lift every revocation).
            for (what, now, had) in [
                (
                    "meshid-ca-authorities",
                    &authorities.version,
                    &versions.authorities,
                ),
                (
                    "meshid-ca-token-keys",
                    &tokens.version,
                    &versions.token_keys,
                ),
                (
                    "meshid-ca-revocations",
                    &revocations.version,
                    &versions.revocations,
                ),
            ] {
                if *now == crate::store::Version::absent()
                    && *had != crate::store::Version::absent()
                {
                    self.schedule_note(format!(
                        "{what} is gone from the {}; what is in force here stays. Restore it from a backup",
                        self.store.describe()
                    ));
                }
            }
            if authorities.version != versions.authorities && !authorities.value.is_empty() {
                match Authorities::new(self.td().clone(), authorities.value) {
                    Ok(next) => {
                        info!(
                            "CA keys changed in the {}; in force here now",
                            self.store.describe()
                        );
                        self.authorities.store(Arc::new(next));
                        versions.authorities = authorities.version;
                        bundle_changed = true;
                    }
                    Err(e) => error!(
                        "the CA keys in the {} are refused, the keys in force stay: {e}",
                        self.store.describe()
                    ),
                }
            }
            if tokens.version != versions.token_keys && !tokens.value.is_empty() {
                let parsed = tokens
                    .value
                    .into_iter()
                    .map(TokenKey::from_record)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| e.to_string())
                    .and_then(|keys| TokenKeys::new(keys).map_err(|e| e.to_string()));
                match parsed {
                    Ok(next) => {
                        info!(
                            "token-signing keys changed in the {}; in force here now",
                            self.store.describe()
                        );
                        self.token_keys.store(Arc::new(next));
                        versions.token_keys = tokens.version;
                        bundle_changed = true;
                    }
                    Err(e) => error!(
                        "the token keys in the {} are refused, the keys in force stay: {e}",
                        self.store.describe()
                    ),
                }
            }
            if revocations.version != versions.revocations
                && revocations.version != crate::store::Version::absent()
            {
                versions.revocations = revocations.version;
                let revoked = revoked_of(&revocations.value);
                *lock(&self.rotation.revocations) = revocations.value;
                self.directory.send_if_modified(|d| {
                    if *d.revoked() == revoked {
                        return false;
                    }
                    info!(
                        "revocations changed in the {}; in force here now",
                        self.store.describe()
                    );
                    let mut next = (**d).clone();
                    next.set_revoked(revoked);
                    next.sequence += 1;
                    *d = Arc::new(next);
                    true
                });
            }
        }
        lock(&self.rotation.issued).merge_others(&self.config.replica, &replicas);
        if bundle_changed {
            self.publish_bundle();
        }
        Ok(())
    }

    async fn sync_store(self: &Arc<Self>) {
        // Not while a step runs here: a read from before its save would put the older state
        // back in force (the step itself reads the store first).
        let _no_step = self.rotation.step.lock().await;
        let core = self.clone();
        match tokio::task::spawn_blocking(move || core.sync_store_blocking()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => self.schedule_note(format!(
                "reading the CA state from the {}: {e}; what is in force here stays",
                self.store.describe()
            )),
            Err(e) => error!("reading the CA state: {e}"),
        }
    }

    /// Whether this replica runs the automatic schedule now (it holds the rotation lease).
    async fn lead(self: &Arc<Self>, leading: bool) -> bool {
        let core = self.clone();
        let now = match tokio::task::spawn_blocking(move || {
            core.store.try_lead(&core.config.replica, LEASE_TTL)
        })
        .await
        {
            Ok(Ok(l)) => l,
            Ok(Err(e)) => {
                self.schedule_note(format!("the rotation lease: {e}"));
                false
            }
            Err(_) => false,
        };
        if now != leading {
            info!(
                replica = %self.config.replica,
                "{}",
                if now {
                    "this replica runs the automatic rotation schedule now"
                } else {
                    "another replica runs the automatic rotation schedule"
                }
            );
        }
        now
    }

    /// Say what has expired or is about to, and the one command that recovers.
    pub fn warn_expiry(&self) {
        let now = self.clock.now();
        let authorities = self.authorities.load();
        let Ok(active) = authorities.active() else {
            return;
        };
        let dir = self.config.data_dir.display();
        if active.root_not_after <= now {
            error!(
                "the CA's root expired at {}: no SVID can be issued or verified. Recover with: meshid ca rotate recover --what root --data-dir {dir}",
                rfc3339(active.root_not_after)
            );
        } else if active.intermediate_not_after <= now {
            error!(
                "the CA's intermediate expired at {}: no SVID can be issued. Recover with: meshid ca rotate recover --what intermediate --data-dir {dir}",
                rfc3339(active.intermediate_not_after)
            );
        } else {
            let (start, end) = x509_life(active);
            let left = end.duration_since(now).unwrap_or_default();
            if left < end.duration_since(start).unwrap_or_default() / 10 {
                warn!(
                    "the CA's signing authority expires at {} (in {}s){}",
                    rfc3339(end),
                    left.as_secs(),
                    if self.config.rotation.auto {
                        ""
                    } else {
                        "; automatic rotation is off: meshid ca rotate prepare"
                    }
                );
            }
        }
    }

    /// The schedule (on the replica holding the rotation lease), the saving of issued
    /// serials, and following the other replicas' changes, until `shutdown`.
    pub fn spawn_rotation(self: &Arc<Self>, shutdown: CancellationToken) {
        let core = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SCHEDULE_TICK);
            let mut flush = tokio::time::interval(ISSUED_FLUSH);
            let mut expiry = tokio::time::interval(Duration::from_secs(600));
            // A store that tells of changes is read when it does, and every RESYNC besides;
            // the others every POLL.
            let changes = core.store.changes();
            let mut sync = tokio::time::interval(if changes.is_some() { RESYNC } else { POLL });
            let changed = changes.unwrap_or_default();
            let mut lease = tokio::time::interval(LEASE_TTL / 3);
            let mut leading = false;
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = lease.tick(), if core.config.rotation.auto => {
                        leading = core.lead(leading).await;
                    }
                    _ = tick.tick(), if core.config.rotation.auto && leading => {
                        core.auto_rotate().await
                    }
                    _ = flush.tick() => core.flush_issued().await,
                    _ = sync.tick() => core.sync_store().await,
                    _ = changed.notified() => core.sync_store().await,
                    _ = expiry.tick() => core.warn_expiry(),
                }
            }
            core.flush_issued().await;
            debug!("rotation tasks stopped");
        });
    }
}

/// Whether the prepared authority `p` is a new root or a new intermediate under the active root.
fn kind_of(p: &X509Authority, authorities: &Authorities) -> What {
    match authorities.active() {
        Ok(a) if a.root == p.root => What::Intermediate,
        _ => What::Root,
    }
}

/// What the schedule prepares for `active` at `now`: a new root once the root is past half its
/// life, else a new intermediate under it.
fn x509_due_kind(active: &X509Authority, now: SystemTime) -> What {
    let (root_half, _) = schedule(active.root_not_before + BACKDATE, active.root_not_after);
    if now >= root_half {
        What::Root
    } else {
        What::Intermediate
    }
}

/// The bundle of `authorities` with the hints a rotation sends.
pub fn bundle_of(authorities: &Authorities, tokens: &TokenKeys, window: Duration) -> TrustBundle {
    let mut bundle = authorities.bundle(0);
    let old: Vec<&X509Authority> = authorities
        .keys()
        .iter()
        .filter(|k| k.state == KeyState::Old)
        .collect();
    let tainted = old.iter().any(|k| k.record().tainted);
    bundle.rotation = RotationHints {
        renew_issuers: old.iter().map(|k| cert_sha256(&k.intermediate)).collect(),
        renew_window: if tainted {
            TAINT_RENEW_WINDOW.min(window)
        } else {
            window
        },
        token_kids: tokens
            .keys()
            .iter()
            .filter(|k| k.state.trusted())
            .map(|k| k.kid.clone())
            .collect(),
    };
    bundle
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + s)
    }

    #[test]
    fn serials_are_recorded_in_one_form_whatever_the_tool_printed() {
        let canonical = "a1b2c3d4e5f60718293a4b5c6d7e8f9";
        for printed in [
            "0a1b2c3d4e5f60718293a4b5c6d7e8f9", // meshid inspect
            "0A:1B:2C:3D:4E:5F:60:71:82:93:A4:B5:C6:D7:E8:F9", // openssl
            "0xa1b2c3d4e5f60718293a4b5c6d7e8f9", // an integer in hex
        ] {
            assert_eq!(normalize_serial(printed).unwrap(), canonical, "{printed}");
        }
        // A 20-byte serial with its high bit set carries a sign octet in DER.
        let long = format!("00{}", "8f".repeat(20));
        assert_eq!(normalize_serial(&long).unwrap(), "8f".repeat(20));
        for bad in ["", "xyz", "12 34", &"f".repeat(65)] {
            assert_eq!(normalize_serial(bad), None, "{bad:?}");
        }
        // The deny list matches the DER form the inbound sees against the canonical one.
        let mut revoked = Revoked::default();
        revoked.serials.insert(canonical.to_owned());
        let id = SpiffeId::parse("spiffe://cluster.local/x").unwrap();
        assert!(
            revoked
                .refuses(&id, "0a1b2c3d4e5f60718293a4b5c6d7e8f9")
                .is_some()
        );
        assert!(
            revoked
                .refuses(&id, "0a1b2c3d4e5f60718293a4b5c6d7e8f8")
                .is_none()
        );
    }

    #[test]
    fn the_schedule_prepares_at_half_life_and_activates_a_sixth_before_the_end() {
        assert_eq!(schedule(at(0), at(600)), (at(300), at(500)));
        // A key that already ended: both steps are due.
        assert_eq!(schedule(at(10), at(10)), (at(10), at(10)));
    }

    #[test]
    fn the_bundle_names_old_intermediates_and_keeps_one_copy_of_a_shared_root() {
        let td = meshid_proto::TrustDomain::parse("cluster.local").unwrap();
        let now = SystemTime::now();
        let first = X509Authority::generate(&td, now, KeyState::Old).unwrap();
        let second = X509Authority::new_intermediate(
            &td,
            now,
            KeyState::Active,
            first.record(),
            Duration::from_secs(3600),
        )
        .unwrap();
        let authorities =
            Authorities::new(td, vec![first.record().clone(), second.record().clone()]).unwrap();
        let tokens = TokenKeys::new(vec![
            TokenKey::generate(crate::token::TokenAlg::Es256, KeyState::Active, now).unwrap(),
        ])
        .unwrap();
        let b = bundle_of(&authorities, &tokens, Duration::from_secs(60));
        assert_eq!(b.roots.len(), 1, "one root for both intermediates");
        assert_eq!(
            b.rotation.renew_issuers,
            vec![cert_sha256(&first.intermediate)]
        );
        assert_eq!(b.rotation.renew_window, Duration::from_secs(60));
        assert_eq!(b.rotation.token_kids.len(), 1);
    }

    #[test]
    fn issued_serials_under_an_authority_are_live_until_they_expire() {
        let mut issued = Issued::default();
        for (serial, authority, not_after) in [("01", "a", 100), ("02", "a", 50), ("03", "b", 100)]
        {
            issued.by_serial.insert(
                serial.into(),
                IssuedRecord {
                    serial: serial.into(),
                    spiffe_id: "spiffe://td/x".into(),
                    authority: authority.into(),
                    not_after: unix_seconds(at(0)) + not_after,
                },
            );
        }
        assert_eq!(issued.live_under("a", at(10)).len(), 2);
        assert_eq!(issued.live_under("a", at(60)).len(), 1);
        issued.prune(at(60));
        assert!(issued.dirty);
        assert_eq!(issued.by_serial.len(), 2);
    }

    fn record(serial: &str, authority: &str) -> IssuedRecord {
        IssuedRecord {
            serial: serial.into(),
            spiffe_id: format!("spiffe://td/{serial}"),
            authority: authority.into(),
            not_after: unix_seconds(at(0)) + 100,
        }
    }

    fn replica(name: &str, issued: &[&str], renewed: &[&str]) -> ReplicaRecord {
        ReplicaRecord {
            replica: name.into(),
            updated_at: unix_seconds(at(0)),
            issued: issued.iter().map(|s| record(s, "a")).collect(),
            renewed: renewed.iter().map(|s| record(s, "a")).collect(),
            authorities: "v1".into(),
            token_keys: "t1".into(),
        }
    }

    fn live(issued: &Issued) -> Vec<String> {
        let mut v: Vec<String> = issued
            .live_under("a", at(10))
            .iter()
            .map(|r| r.serial.clone())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn the_live_set_is_every_replicas_issued_less_every_replicas_renewed() {
        // ca-0 issued 01 and 02; ca-1 issued 03 and saw 01 renewed.
        let store = [
            replica("ca-0", &["01", "02"], &[]),
            replica("ca-1", &["03"], &["01"]),
        ];
        let state = RotationState::new("ca-2", &store, vec![]);
        let mut issued = lock(&state.issued);
        assert_eq!(live(&issued), ["02", "03"]);
        assert_eq!(issued.peers.len(), 2);
        // ca-2 sees 02 renewed: gone from its view at once, and a tombstone it will save.
        issued.renew("02");
        assert!(issued.dirty);
        assert_eq!(live(&issued), ["03"]);
        assert!(issued.renewed.contains_key("02"));
        // Read again before ca-0 has read ca-2's record: 02 stays renewed.
        issued.merge_others("ca-2", &store);
        assert_eq!(live(&issued), ["03"]);
        // A replica's own issued serial, renewed by another: dropped from its own record.
        let mine = RotationState::new(
            "ca-0",
            &[
                replica("ca-0", &["01", "02"], &[]),
                replica("ca-1", &[], &["02"]),
            ],
            vec![],
        );
        let own = lock(&mine.issued);
        assert_eq!(live(&own), ["01"]);
        assert!(!own.by_serial.contains_key("02"));
    }
}
