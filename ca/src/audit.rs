//! The audit log: JSON lines saying who was issued or refused what, when and why. Never a key
//! or a token: records are built from IDs, serials and reasons only.
//!
//! Two paths into one file. Issuances and grants go through [`Audit::write`], which returns
//! once the line is written (to the kernel): the reply leaves after its record, for
//! accountability. Refusals go through [`Audit::refusal`], which never waits for the disk and
//! never lets a flood of refusals become a flood of lines: refusals are aggregated per
//! (peer IP, SPIFFE ID, event, attestation, reason) over a short window. The first of a window
//! is written at once by the writer thread; the repeats are counted, and when the window ends
//! one record with `count` (how many were not written one by one) and `first`/`last` stands
//! for them. The WARN log follows the same rule: the first refusal of a window at WARN, one
//! "N more like this" at its end, each repeat at DEBUG. Memory stays bounded under a flood:
//! at most [`MAX_KEYS`] keys per window (refusals with further keys are merged into one
//! overflow record, event [`OVERFLOW_EVENT`]) and at most [`QUEUE_CAP`] records waiting for
//! the writer (a record that finds the queue full is counted into its aggregate instead).
//! Every refusal is accounted for: the sum over refusal lines of `count` (1 when absent) is the
//! number of refusals.

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use tracing::{debug, error, warn};

/// How long repeats of one refusal are counted before their record is written.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(10);
/// Most distinct refusal keys aggregated at once; further keys go to the overflow record.
pub const MAX_KEYS: usize = 10_000;
/// Most refusal records waiting for the writer thread.
pub const QUEUE_CAP: usize = 1024;
/// The event of the record that stands for refusals merged because [`MAX_KEYS`] was reached.
pub const OVERFLOW_EVENT: &str = "refusals_merged";
/// Longest refusal reason kept (a reason may quote what the client sent).
const MAX_REASON_BYTES: usize = 512;
/// How long [`Audit::flush`] waits for the writer.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditRecord {
    pub time: String,
    pub event: &'static str,
    pub outcome: &'static str,
    pub attestation: Option<&'static str>,
    pub spiffe_id: Option<String>,
    pub serial: Option<String>,
    pub expires_at: Option<String>,
    pub peer: Option<String>,
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audience: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scope_requested: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scope_granted: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    /// On an aggregated refusal record: how many refusals it stands for (none of them was
    /// written on its own line).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    /// On an aggregated record: the time of the first and of the last refusal it counts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last: Option<String>,
}

impl AuditRecord {
    pub fn new(event: &'static str, outcome: &'static str, now: SystemTime) -> Self {
        Self {
            time: humantime::format_rfc3339_millis(now).to_string(),
            event,
            outcome,
            attestation: None,
            spiffe_id: None,
            serial: None,
            expires_at: None,
            peer: None,
            reason: None,
            audience: None,
            scope_requested: None,
            scope_granted: None,
            jti: None,
            count: None,
            first: None,
            last: None,
        }
    }

    /// Fold a later refusal of the same key into this aggregate: one more in `count`, `last`
    /// moves, and a detail the two disagree on is dropped rather than misreported.
    fn absorb(&mut self, other: AuditRecord) {
        fn keep_if_same<T: PartialEq>(mine: &mut Option<T>, theirs: Option<T>) {
            if *mine != theirs {
                *mine = None;
            }
        }
        self.count = Some(self.count.unwrap_or(1) + 1);
        keep_if_same(&mut self.attestation, other.attestation);
        keep_if_same(&mut self.spiffe_id, other.spiffe_id);
        keep_if_same(&mut self.serial, other.serial);
        keep_if_same(&mut self.expires_at, other.expires_at);
        keep_if_same(&mut self.reason, other.reason);
        keep_if_same(&mut self.audience, other.audience);
        keep_if_same(&mut self.scope_requested, other.scope_requested);
        keep_if_same(&mut self.scope_granted, other.scope_granted);
        keep_if_same(&mut self.jti, other.jti);
        self.time = other.time.clone();
        self.last = Some(other.time);
    }

    /// The first refusal of an aggregate.
    fn opening(mut self) -> Self {
        self.count = Some(1);
        self.first = Some(self.time.clone());
        self.last = Some(self.time.clone());
        self
    }
}

/// Append-only JSON-lines sink, shared by every request handler.
#[derive(Clone)]
pub struct Audit {
    handle: Arc<Handle>,
}

/// Owned by the `Audit` clones only (not by the writer thread): when the last one goes, the
/// writer writes what is pending and stops.
struct Handle {
    shared: Arc<Shared>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shared.lock_state().closed = true;
        self.shared.wake.notify_all();
    }
}

struct Shared {
    /// Both paths write whole lines under this lock, so lines never interleave.
    file: Mutex<File>,
    state: Mutex<State>,
    /// Wakes the writer: a record queued, a flush asked for, the last handle dropped.
    wake: Condvar,
    /// Wakes [`Audit::flush`] callers.
    flushed: Condvar,
    /// Records that could not be written (a full or failing disk), for the metrics.
    lost: std::sync::atomic::AtomicU64,
}

impl Shared {
    fn lock_state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Serialize `records` and append them under the file lock, in one write.
    fn append<'a>(
        &self,
        records: impl IntoIterator<Item = &'a AuditRecord>,
    ) -> std::io::Result<()> {
        let mut lines = Vec::new();
        for record in records {
            serde_json::to_writer(&mut lines, record).expect("audit records serialize");
            lines.push(b'\n');
        }
        if lines.is_empty() {
            return Ok(());
        }
        let count = lines.iter().filter(|b| **b == b'\n').count() as u64;
        let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
        // Other processes append to the same log (`meshid ca join-token`, a second CA on the
        // same directory during an update): the length read, the write and the cut below
        // happen under an exclusive file lock that every writer takes.
        let locked = f.lock();
        let before = f.metadata().map(|m| m.len());
        // One write(2) with O_APPEND, under the locks: lines never interleave.
        let written = f.write_all(&lines);
        if written.is_err() {
            self.lost
                .fetch_add(count, std::sync::atomic::Ordering::Relaxed);
            // A full disk may have taken part of a line: cut it off, so every line stays
            // whole JSON and the next one starts on its own line. Only under the file lock:
            // without it the cut could take another writer's lines.
            if let (Ok(()), Ok(len)) = (&locked, before) {
                let _ = f.set_len(len);
            }
        }
        if locked.is_ok() {
            let _ = f.unlock();
        }
        written
    }
}

impl Audit {
    pub fn open(path: &Path) -> std::io::Result<Self> {
        Self::open_with_window(path, DEFAULT_WINDOW)
    }

    /// [`Audit::open`] with another aggregation window for refusals (tests use short ones).
    pub fn open_with_window(path: &Path, window: Duration) -> std::io::Result<Self> {
        Self::open_with(path, window, MAX_KEYS, QUEUE_CAP)
    }

    fn open_with(
        path: &Path,
        window: Duration,
        max_keys: usize,
        queue_cap: usize,
    ) -> std::io::Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)?;
        let shared = Arc::new(Shared {
            file: Mutex::new(file),
            state: Mutex::new(State::new(window, max_keys, queue_cap)),
            wake: Condvar::new(),
            flushed: Condvar::new(),
            lost: Default::default(),
        });
        let writer = shared.clone();
        std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || run_writer(&writer))?;
        Ok(Self {
            handle: Arc::new(Handle { shared }),
        })
    }

    /// Records that could not be written so far (each also logged).
    pub fn lost(&self) -> u64 {
        self.handle
            .shared
            .lost
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Write one record (an issuance or a grant). Blocking: call from `spawn_blocking` in
    /// async code. Returns once the line is written to the kernel.
    pub fn write(&self, record: &AuditRecord) -> std::io::Result<()> {
        self.handle.shared.append([record])
    }

    /// Account for one refusal. Never blocks on the disk (it takes a lock held only for map
    /// updates) and never fails: the record is written by the writer thread, alone if it is
    /// the first of its key in this window, else counted into the window's aggregate.
    pub fn refusal(&self, mut record: AuditRecord) {
        // Every field a client can fill is bounded, so a window's memory is too.
        for field in [
            record.reason.as_mut(),
            record.scope_requested.as_mut(),
            record.audience.as_mut(),
            record.spiffe_id.as_mut(),
        ]
        .into_iter()
        .flatten()
        {
            truncate(field, MAX_REASON_BYTES);
        }
        let key = Key::of(&record);
        let shared = &self.handle.shared;
        let seen = shared.lock_state().refusal(&key, record, Instant::now());
        let peer = key.peer.as_deref().unwrap_or("-");
        let spiffe_id = key.spiffe_id.as_deref().unwrap_or("-");
        let reason = key.reason.as_deref().unwrap_or("");
        match seen {
            Seen::First | Seen::QueueFull => {
                if matches!(seen, Seen::First) {
                    shared.wake.notify_one();
                }
                warn!(event = key.event, peer, spiffe_id, reason, "refused");
            }
            Seen::Repeat => {
                debug!(
                    event = key.event,
                    peer, spiffe_id, reason, "refused (again)"
                );
            }
            Seen::Overflow { opened: true } => warn!(
                event = key.event,
                peer,
                spiffe_id,
                reason,
                "refused; over {MAX_KEYS} distinct refusals in this window: further ones are \
                 merged into one audit record"
            ),
            Seen::Overflow { opened: false } => {
                debug!(
                    event = key.event,
                    peer, spiffe_id, reason, "refused (merged)"
                );
            }
        }
    }

    /// Write every pending refusal and aggregate now (at shutdown). Waits for the writer, at
    /// most a few seconds.
    pub fn flush(&self) {
        let shared = &self.handle.shared;
        let mut state = shared.lock_state();
        state.flush_requested += 1;
        let target = state.flush_requested;
        shared.wake.notify_all();
        let deadline = Instant::now() + FLUSH_TIMEOUT;
        while state.flush_done < target {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                error!("audit log: pending refusal records not written within {FLUSH_TIMEOUT:?}");
                return;
            }
            state = shared
                .flushed
                .wait_timeout(state, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// The writer thread: writes queued first refusals as they come and aggregates as their
/// windows end. Never holds the state lock while writing, so a slow disk stalls only itself.
fn run_writer(shared: &Shared) {
    let mut state = shared.lock_state();
    loop {
        let flush_target = state.flush_requested;
        let closed = state.closed;
        let all = closed || flush_target > state.flush_done;
        let firsts = std::mem::take(&mut state.queue);
        let summaries = state.close(Instant::now(), all);
        if !firsts.is_empty() || !summaries.is_empty() {
            drop(state);
            let written = shared.append(firsts.iter().chain(summaries.iter().map(|(_, r)| r)));
            if let Err(e) = written {
                error!(
                    "audit log write failed, records lost (meshid_ca_audit_write_failures_total): {e}"
                );
            }
            for (key, summary) in &summaries {
                summarise(key.as_deref(), summary);
            }
            state = shared.lock_state();
        }
        if all {
            state.flush_done = state.flush_done.max(flush_target);
            shared.flushed.notify_all();
        }
        if closed {
            return;
        }
        if !state.queue.is_empty() || state.closed || state.flush_requested > state.flush_done {
            continue;
        }
        // Every window opened while waiting ends after this wait would: none is missed.
        let wait = state.next_deadline().map_or(state.window, |d| {
            d.saturating_duration_since(Instant::now())
        });
        state = shared
            .wake
            .wait_timeout(state, wait)
            .unwrap_or_else(|p| p.into_inner())
            .0;
    }
}

/// The one WARN line for the repeats of a window.
fn summarise(key: Option<&Key>, summary: &AuditRecord) {
    let n = summary.count.unwrap_or(1);
    match key {
        Some(key) => {
            let peer = key.peer.as_deref().unwrap_or("-");
            warn!(
                event = key.event,
                spiffe_id = key.spiffe_id.as_deref().unwrap_or("-"),
                reason = key.reason.as_deref().unwrap_or(""),
                "refused: {n} more like this from {peer}"
            );
        }
        None => warn!("refused: {n} more from further peers, merged into one audit record"),
    }
}

/// What refusals are aggregated by. The peer is its IP: a client's ports change per
/// connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    peer: Option<String>,
    spiffe_id: Option<String>,
    event: &'static str,
    attestation: Option<&'static str>,
    reason: Option<String>,
}

impl Key {
    fn of(record: &AuditRecord) -> Self {
        Self {
            peer: record.peer.as_deref().map(peer_ip),
            spiffe_id: record.spiffe_id.clone(),
            event: record.event,
            attestation: record.attestation,
            reason: record.reason.clone(),
        }
    }
}

/// "ip:port" -> "ip" (the peer field holds a socket address).
fn peer_ip(peer: &str) -> String {
    peer.parse::<SocketAddr>()
        .map_or_else(|_| peer.to_owned(), |a| a.ip().to_string())
}

fn truncate(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
}

/// One key's window.
struct Window {
    ends: Instant,
    /// The refusals of this window not written on their own line, as one record.
    pending: Option<AuditRecord>,
}

impl Window {
    fn new(ends: Instant) -> Self {
        Self {
            ends,
            pending: None,
        }
    }

    fn count(&mut self, record: AuditRecord) {
        match &mut self.pending {
            Some(p) => p.absorb(record),
            None => self.pending = Some(record.opening()),
        }
    }
}

/// How [`State::refusal`] took a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    /// The first of its key in this window: queued for the writer.
    First,
    /// The first of its key, but the writer's queue was full: counted instead.
    QueueFull,
    /// A repeat within the window: counted.
    Repeat,
    /// Too many keys already: merged into the overflow record (`opened`: the first so).
    Overflow { opened: bool },
}

/// The aggregator and the writer's queue, under one lock (so what the writer takes from one
/// always matches the other).
struct State {
    window: Duration,
    max_keys: usize,
    queue_cap: usize,
    windows: HashMap<Arc<Key>, Window>,
    /// Keys by the end of their window; windows all last as long, so this is in order.
    ends: VecDeque<(Instant, Arc<Key>)>,
    overflow: Option<Window>,
    /// First refusals waiting for the writer.
    queue: Vec<AuditRecord>,
    flush_requested: u64,
    flush_done: u64,
    closed: bool,
}

impl State {
    fn new(window: Duration, max_keys: usize, queue_cap: usize) -> Self {
        Self {
            window,
            max_keys,
            queue_cap,
            windows: HashMap::new(),
            ends: VecDeque::new(),
            overflow: None,
            queue: Vec::new(),
            flush_requested: 0,
            flush_done: 0,
            closed: false,
        }
    }

    fn refusal(&mut self, key: &Key, record: AuditRecord, now: Instant) -> Seen {
        if let Some(w) = self.windows.get_mut(key) {
            w.count(record);
            return Seen::Repeat;
        }
        if self.windows.len() >= self.max_keys {
            let opened = self.overflow.is_none();
            let ends = now + self.window;
            self.overflow
                .get_or_insert_with(|| Window::new(ends))
                .count(record);
            return Seen::Overflow { opened };
        }
        let key = Arc::new(key.clone());
        let mut w = Window::new(now + self.window);
        self.ends.push_back((w.ends, key.clone()));
        let seen = if self.queue.len() < self.queue_cap {
            self.queue.push(record);
            Seen::First
        } else {
            w.count(record);
            Seen::QueueFull
        };
        self.windows.insert(key, w);
        seen
    }

    /// Close the windows ended by `now` (all of them if `all`): the aggregate records to
    /// write, each with its key (none for the overflow record).
    fn close(&mut self, now: Instant, all: bool) -> Vec<(Option<Arc<Key>>, AuditRecord)> {
        let mut out = Vec::new();
        while let Some((ends, _)) = self.ends.front() {
            if !all && *ends > now {
                break;
            }
            let (_, key) = self.ends.pop_front().expect("front exists");
            if let Some(mut pending) = self.windows.remove(&key).and_then(|w| w.pending) {
                // Ports differ between the refusals counted: the record names the peer's IP.
                pending.peer = key.peer.clone();
                out.push((Some(key), pending));
            }
        }
        if self.overflow.as_ref().is_some_and(|o| all || o.ends <= now)
            && let Some(pending) = self.overflow.take().and_then(|o| o.pending)
        {
            let mut merged = AuditRecord::new(OVERFLOW_EVENT, "refused", SystemTime::UNIX_EPOCH);
            merged.time = pending.time;
            merged.reason = Some(format!(
                "over {} distinct refusals in one window; further ones merged",
                self.max_keys
            ));
            merged.count = pending.count;
            merged.first = pending.first;
            merged.last = pending.last;
            out.push((None, merged));
        }
        out
    }

    fn next_deadline(&self) -> Option<Instant> {
        let key = self.ends.front().map(|(t, _)| *t);
        let overflow = self.overflow.as_ref().map(|o| o.ends);
        match (key, overflow) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(peer: &str, reason: &str) -> AuditRecord {
        let mut r = AuditRecord::new("x509_svid_issue", "refused", SystemTime::now());
        r.attestation = Some("join_token");
        r.peer = Some(peer.to_owned());
        r.reason = Some(reason.to_owned());
        r
    }

    fn lines(path: &Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).expect("every line is one JSON record"))
            .collect()
    }

    /// How many refusals the lines account for.
    fn accounted(lines: &[serde_json::Value]) -> u64 {
        lines
            .iter()
            .filter(|l| l["outcome"] == "refused")
            .map(|l| l["count"].as_u64().unwrap_or(1))
            .sum()
    }

    #[test]
    fn a_flood_from_one_peer_with_one_reason_is_at_most_two_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let audit = Audit::open_with_window(&path, Duration::from_secs(60)).unwrap();
        for i in 0..10_000u32 {
            let port = 1024 + i % 60_000;
            audit.refusal(refused(
                &format!("10.0.0.7:{port}"),
                "join token is not known to this CA",
            ));
        }
        audit.flush();
        let lines = lines(&path);
        assert!(lines.len() <= 2, "{lines:#?}");
        assert_eq!(accounted(&lines), 10_000);
        assert_eq!(
            lines[0]["peer"], "10.0.0.7:1024",
            "the first is written as it came"
        );
        assert!(lines[0].get("count").is_none());
        let summary = &lines[1];
        assert_eq!(summary["count"], 9_999);
        assert_eq!(
            summary["peer"], "10.0.0.7",
            "the aggregate names the peer's IP"
        );
        assert_eq!(summary["reason"], "join token is not known to this CA");
        assert!(summary["first"].is_string() && summary["last"].is_string());
    }

    #[test]
    fn two_peers_or_two_reasons_are_separate_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let audit = Audit::open_with_window(&path, Duration::from_secs(60)).unwrap();
        for _ in 0..3 {
            audit.refusal(refused("10.0.0.1:5000", "unknown"));
            audit.refusal(refused("10.0.0.2:5000", "unknown"));
            audit.refusal(refused("10.0.0.1:5001", "expired"));
            audit.refusal(refused("[2001:db8::1]:5000", "unknown"));
        }
        audit.flush();
        let lines = lines(&path);
        assert_eq!(
            lines.len(),
            8,
            "a first line and an aggregate per key: {lines:#?}"
        );
        let mut by_key: HashMap<(String, String), u64> = HashMap::new();
        for l in &lines {
            let peer = peer_ip(l["peer"].as_str().unwrap());
            let reason = l["reason"].as_str().unwrap().to_owned();
            *by_key.entry((peer, reason)).or_default() += l["count"].as_u64().unwrap_or(1);
        }
        let want: HashMap<(String, String), u64> = [
            ("10.0.0.1", "unknown"),
            ("10.0.0.2", "unknown"),
            ("10.0.0.1", "expired"),
            ("2001:db8::1", "unknown"),
        ]
        .into_iter()
        .map(|(p, r)| ((p.to_owned(), r.to_owned()), 3))
        .collect();
        assert_eq!(by_key, want);
    }

    #[test]
    fn the_aggregator_stays_bounded_with_100_000_distinct_peers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let audit = Audit::open_with_window(&path, Duration::from_secs(60)).unwrap();
        for i in 0..100_000u32 {
            let [_, b, c, d] = i.to_be_bytes();
            audit.refusal(refused(&format!("10.{b}.{c}.{d}:443"), "unknown"));
        }
        {
            let state = audit.handle.shared.lock_state();
            assert!(state.windows.len() <= MAX_KEYS, "{}", state.windows.len());
            assert_eq!(state.windows.len(), state.ends.len());
            assert!(state.queue.len() <= QUEUE_CAP);
            assert!(state.overflow.is_some(), "the rest are merged");
        }
        audit.flush();
        let lines = lines(&path);
        assert!(lines.len() <= MAX_KEYS * 2 + 1, "{}", lines.len());
        assert_eq!(accounted(&lines), 100_000);
        let merged: Vec<_> = lines
            .iter()
            .filter(|l| l["event"] == OVERFLOW_EVENT)
            .collect();
        assert_eq!(merged.len(), 1, "one overflow record per window");
        assert_eq!(merged[0]["count"], 90_000);
    }

    #[test]
    fn a_refusal_does_not_wait_for_a_stuck_writer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let audit = Audit::open_with(&path, Duration::from_secs(60), MAX_KEYS, 4).unwrap();
        // The disk is stuck: nobody can write a line while this is held.
        let stuck = audit.handle.shared.file.lock().unwrap();
        let (done, finished) = std::sync::mpsc::channel();
        let flood = audit.clone();
        std::thread::spawn(move || {
            for i in 0..20_000u32 {
                flood.refusal(refused(
                    &format!("10.1.{}.{}:80", i % 100, i % 7),
                    "unknown",
                ));
            }
            done.send(()).unwrap();
        });
        finished
            .recv_timeout(Duration::from_secs(30))
            .expect("refusals return while the audit file is locked");
        {
            let state = audit.handle.shared.lock_state();
            assert!(state.queue.len() <= 4);
        }
        drop(stuck);
        audit.flush();
        let lines = lines(&path);
        assert_eq!(
            accounted(&lines),
            20_000,
            "what did not fit the queue is counted"
        );
        assert!(lines.len() <= 2 * 700, "{}", lines.len());
    }

    #[test]
    fn a_window_ends_with_its_count_without_a_flush() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let audit = Audit::open_with_window(&path, Duration::from_millis(100)).unwrap();
        for _ in 0..5 {
            audit.refusal(refused("10.0.0.9:1", "unknown"));
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let lines = lines(&path);
            if lines.len() == 2 {
                assert_eq!(lines[1]["count"], 4);
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no aggregate after the window: {lines:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // A new window opens with a line of its own.
        audit.refusal(refused("10.0.0.9:2", "unknown"));
        audit.flush();
        let lines = lines(&path);
        assert_eq!(lines.len(), 3);
        assert_eq!(accounted(&lines), 6);
    }

    #[test]
    fn grants_and_refusals_never_share_a_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let audit = Audit::open_with_window(&path, Duration::from_millis(5)).unwrap();
        let writers: Vec<_> = (0..4)
            .map(|t| {
                let audit = audit.clone();
                std::thread::spawn(move || {
                    for i in 0..500u32 {
                        let mut grant =
                            AuditRecord::new("token_grant", "granted", SystemTime::now());
                        grant.jti = Some(format!("{t}-{i}"));
                        audit.write(&grant).unwrap();
                        audit.refusal(refused(&format!("10.2.{t}.{}:1", i % 50), "unknown"));
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        audit.flush();
        let lines = lines(&path); // each line parses as one record
        assert_eq!(
            lines.iter().filter(|l| l["outcome"] == "granted").count(),
            2_000
        );
        assert_eq!(accounted(&lines), 2_000);
    }

    #[test]
    fn count_first_and_last_appear_only_on_aggregates() {
        let plain = serde_json::to_value(refused("10.0.0.1:1", "unknown")).unwrap();
        for field in ["count", "first", "last"] {
            assert!(plain.get(field).is_none(), "{plain}");
        }
        let mut agg = refused("10.0.0.1:1", "unknown").opening();
        agg.absorb(refused("10.0.0.1:2", "unknown"));
        let agg = serde_json::to_value(agg).unwrap();
        assert_eq!(agg["count"], 2);
        assert!(agg["first"].is_string() && agg["last"].is_string());
    }

    #[test]
    fn a_long_reason_is_cut_at_a_character_boundary() {
        let mut s = "é".repeat(400);
        truncate(&mut s, MAX_REASON_BYTES);
        assert!(s.len() <= MAX_REASON_BYTES + '…'.len_utf8());
        assert!(s.ends_with('…'));
    }
}
