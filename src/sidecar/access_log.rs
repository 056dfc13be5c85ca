//! The access log of the callee's sidecar: one JSON line per request decision, with what an
//! auditor asks (who called whom, what, which rule decided, which scopes were needed and
//! shown, the outcome and its reason, the status, the latency, the trace). Never the token,
//! never the query string (either may carry secrets).
//!
//! Refusals are logged by default, allowed requests with `--access-log-allowed`. Off the hot
//! path: a request pushes its entry onto a bounded queue (a vector under an uncontended lock)
//! and goes on; one thread formats and writes. The writer is woken by the first entry after a
//! quiet spell, then takes what has gathered at most every few milliseconds, so under load a
//! request costs no wake-up and a batch costs one write. Should the writer fall behind (a slow
//! disk), the entries that do not fit are dropped and counted
//! (`meshid_access_log_dropped_total`) rather than slowing requests down. A log file renamed or removed (logrotate) is reopened within a
//! second; a write error (disk full) is counted and reported once, and logging resumes when
//! the disk has room again.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use meshid_proto::SpiffeId;
use meshid_proto::directory::{Route, Scope};
use serde::Serialize;

use super::metrics::Metrics;

/// Where the lines go: `--access-log stderr|off|PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sink {
    Off,
    Stderr,
    File(PathBuf),
}

impl std::str::FromStr for Sink {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" | "none" => Ok(Sink::Off),
            "stderr" | "-" => Ok(Sink::Stderr),
            "" => Err("an access log destination is stderr, off or a file path".into()),
            path => Ok(Sink::File(PathBuf::from(path))),
        }
    }
}

/// One decision, as logged: borrowed from the request, serialized where it is made (no
/// copies, no allocation), so the writer thread only moves bytes.
pub struct Entry<'a> {
    /// RFC 3339, UTC, milliseconds.
    pub time: SystemTime,
    /// The caller's SPIFFE ID (from its certificate), and its service name in the policy.
    pub caller: &'a SpiffeId,
    pub caller_service: Option<&'a str>,
    /// This sidecar's SPIFFE ID and service name.
    pub callee: &'a SpiffeId,
    pub callee_service: Option<&'a str>,
    pub method: &'a str,
    /// The canonical path the decision was made on (no query string).
    pub path: &'a str,
    /// The route rule that matched, written `GET /orders` (`* /healthz` without a method).
    pub route: Option<&'a Route>,
    pub scope_required: Option<&'a Scope>,
    /// The scopes of the caller's verified token (none when it showed none, or none verified).
    pub scopes_presented: Option<&'a BTreeSet<String>>,
    /// `allow` or `deny`.
    pub decision: &'static str,
    /// `allowed`, or the refusal reason (the `outcome` label of `meshid_requests_total`).
    pub reason: &'static str,
    pub status: u16,
    /// Until the response head was ready (the app's, for allowed requests), in milliseconds.
    pub latency_ms: f64,
    /// The W3C trace ID of the request, when it carried or started a trace.
    pub trace_id: Option<&'a str>,
}

impl Serialize for Entry<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        struct Shown<T>(T);
        impl<T: std::fmt::Display> Serialize for Shown<T> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(&self.0)
            }
        }
        struct RouteText<'a>(&'a Route);
        impl std::fmt::Display for RouteText<'_> {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                let method = self.0.method.as_deref().unwrap_or("*");
                write!(f, "{method} {}", self.0.path_prefix)
            }
        }
        let mut e = s.serialize_struct("Entry", 15)?;
        e.serialize_field("time", &Shown(humantime::format_rfc3339_millis(self.time)))?;
        e.serialize_field("caller", &Shown(self.caller))?;
        e.serialize_field("caller_service", &self.caller_service)?;
        e.serialize_field("callee", &Shown(self.callee))?;
        e.serialize_field("callee_service", &self.callee_service)?;
        e.serialize_field("method", self.method)?;
        e.serialize_field("path", self.path)?;
        e.serialize_field("route", &self.route.map(|r| Shown(RouteText(r))))?;
        e.serialize_field("scope_required", &self.scope_required.map(Shown))?;
        let none = BTreeSet::new();
        e.serialize_field("scopes_presented", self.scopes_presented.unwrap_or(&none))?;
        e.serialize_field("decision", self.decision)?;
        e.serialize_field("reason", self.reason)?;
        e.serialize_field("status", &self.status)?;
        e.serialize_field("latency_ms", &self.latency_ms)?;
        e.serialize_field("trace_id", &self.trace_id)?;
        e.end()
    }
}

/// How many bytes of lines may wait for the writer before new ones are dropped (about 8,000
/// lines).
const QUEUE_BYTES: usize = 4 << 20;
/// After a write, the writer waits this long for more before it looks again: at most this
/// many wake-ups a second under load, and a line reaches the file at most this late.
const GATHER: Duration = Duration::from_millis(10);

/// Lines written by requests, not yet by the writer.
#[derive(Default)]
struct Pending {
    bytes: Vec<u8>,
    lines: u64,
}

/// What requests and the writer share.
struct Queue {
    pending: Mutex<Pending>,
    /// The writer is parked with nothing to do: the next entry wakes it.
    idle: AtomicBool,
    /// Every [`AccessLog`] is gone: write what is left and stop.
    closed: AtomicBool,
}

pub struct AccessLog {
    queue: Option<(Arc<Queue>, std::thread::Thread)>,
    allowed: bool,
    metrics: Arc<Metrics>,
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        if let Some((queue, writer)) = &self.queue {
            queue.closed.store(true, Ordering::Release);
            writer.unpark();
        }
    }
}

impl AccessLog {
    /// A log to `sink` (allowed requests too when `allowed`); starts the writer thread.
    pub fn start(sink: Sink, allowed: bool, metrics: Arc<Metrics>) -> std::io::Result<Self> {
        let queue = match sink {
            Sink::Off => None,
            Sink::Stderr => Some(spawn(Output::Stderr, metrics.clone())?),
            Sink::File(path) => {
                let file = open(&path)?;
                Some(spawn(Output::File { path, file }, metrics.clone())?)
            }
        };
        Ok(Self {
            queue,
            allowed,
            metrics,
        })
    }

    /// A log that logs nothing.
    pub fn off(metrics: Arc<Metrics>) -> Self {
        Self {
            queue: None,
            allowed: false,
            metrics,
        }
    }

    /// Whether a decision of this kind is logged: build its [`Entry`] only then.
    pub fn wants(&self, allowed: bool) -> bool {
        self.queue.is_some() && (!allowed || self.allowed)
    }

    pub fn log(&self, entry: &Entry<'_>) {
        let Some((queue, writer)) = &self.queue else {
            return;
        };
        let half_full = {
            let mut pending = queue.pending.lock().unwrap_or_else(|e| e.into_inner());
            let before = pending.bytes.len();
            if before >= QUEUE_BYTES {
                drop(pending);
                self.metrics
                    .access_log_dropped
                    .fetch_add(1, Ordering::Relaxed);
                return;
            }
            if serde_json::to_writer(&mut pending.bytes, entry).is_err() {
                pending.bytes.truncate(before);
                return;
            }
            pending.bytes.push(b'\n');
            pending.lines += 1;
            before < QUEUE_BYTES / 2 && pending.bytes.len() >= QUEUE_BYTES / 2
        };
        // Wake the writer if it sleeps for want of work, or early if the queue fills up.
        if queue.idle.swap(false, Ordering::AcqRel) || half_full {
            writer.unpark();
        }
    }
}

enum Output {
    Stderr,
    File { path: PathBuf, file: File },
}

fn open(path: &PathBuf) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

fn spawn(out: Output, metrics: Arc<Metrics>) -> std::io::Result<(Arc<Queue>, std::thread::Thread)> {
    let queue = Arc::new(Queue {
        pending: Mutex::new(Pending::default()),
        idle: AtomicBool::new(false),
        closed: AtomicBool::new(false),
    });
    let theirs = queue.clone();
    let writer = std::thread::Builder::new()
        .name("access-log".into())
        .spawn(move || write_forever(out, &theirs, &metrics))?;
    Ok((queue, writer.thread().clone()))
}

/// The writer thread: until the log is closed.
fn write_forever(mut out: Output, queue: &Queue, metrics: &Metrics) {
    let mut failing = false;
    let mut sink = sink(&out);
    let mut checked = std::time::Instant::now();
    let mut batch = Pending::default();
    loop {
        let closed = queue.closed.load(Ordering::Acquire);
        {
            let mut pending = queue.pending.lock().unwrap_or_else(|e| e.into_inner());
            std::mem::swap(&mut *pending, &mut batch);
            if batch.lines == 0 && !closed {
                // Nothing to do: sleep until an entry comes (or a second, for the rotation
                // check). Said while holding the lock, so no entry can slip in unseen.
                queue.idle.store(true, Ordering::Release);
            }
        }
        if checked.elapsed() >= Duration::from_secs(1) {
            checked = std::time::Instant::now();
            if let Some(reopened) = reopen_if_moved(&out) {
                out = reopened;
                sink = self::sink(&out);
            }
        }
        if batch.lines == 0 {
            if closed {
                return;
            }
            std::thread::park_timeout(Duration::from_secs(1));
            continue;
        }
        match sink.write_all(&batch.bytes).and_then(|()| sink.flush()) {
            Ok(()) => {
                metrics
                    .access_log_lines
                    .fetch_add(batch.lines, Ordering::Relaxed);
                if failing {
                    failing = false;
                    tracing::info!("access log: writing again");
                }
            }
            Err(e) => write_failed(&mut failing, metrics, &e),
        }
        batch.bytes.clear();
        batch.lines = 0;
        if !closed {
            // Let more gather: one wake-up and one write per batch under load.
            std::thread::park_timeout(GATHER);
        }
    }
}

fn sink(out: &Output) -> Box<dyn Write> {
    match out {
        Output::Stderr => Box::new(std::io::stderr()),
        Output::File { file, .. } => match file.try_clone() {
            Ok(f) => Box::new(f),
            Err(_) => Box::new(std::io::sink()),
        },
    }
}

fn write_failed(failing: &mut bool, metrics: &Metrics, e: &std::io::Error) {
    metrics.access_log_errors.fetch_add(1, Ordering::Relaxed);
    if !*failing {
        *failing = true;
        tracing::warn!("access log: write failed, entries are dropped until it works: {e}");
    }
}

/// A fresh handle when the log file was renamed or removed (logrotate), or `None`.
fn reopen_if_moved(out: &Output) -> Option<Output> {
    let Output::File { path, file } = out else {
        return None;
    };
    let open_now = file.metadata().ok()?;
    let same = std::fs::metadata(path)
        .map(|m| m.ino() == open_now.ino() && m.dev() == open_now.dev())
        .unwrap_or(false);
    if same {
        return None;
    }
    match open(path) {
        Ok(file) => Some(Output::File {
            path: path.clone(),
            file,
        }),
        Err(e) => {
            tracing::warn!("access log: reopening: {e}");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_one(log: &AccessLog, reason: &'static str) {
        let caller = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/frontend").unwrap();
        let callee = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/orders").unwrap();
        let scope = Scope::parse("orders:read").unwrap();
        let route = Route {
            method: Some("GET".into()),
            path_prefix: "/orders".into(),
            scope: Some(scope.clone()),
        };
        let presented = BTreeSet::from(["orders:read".to_owned()]);
        log.log(&Entry {
            time: SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            caller: &caller,
            caller_service: Some("frontend"),
            callee: &callee,
            callee_service: Some("orders"),
            method: "GET",
            path: "/orders/7",
            route: Some(&route),
            scope_required: Some(&scope),
            scopes_presented: Some(&presented),
            decision: "deny",
            reason,
            status: 403,
            latency_ms: 0.25,
            trace_id: None,
        });
    }

    #[test]
    fn lines_are_json_and_follow_a_rotated_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let metrics = Arc::new(Metrics::default());
        let log = AccessLog::start(Sink::File(path.clone()), false, metrics.clone()).unwrap();
        assert!(log.wants(false) && !log.wants(true), "refusals only");
        log_one(&log, "no_route");
        let written = |m: &Metrics| m.access_log_lines.load(Ordering::Relaxed);
        let wait_for = |n: u64| {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while written(&metrics) < n {
                assert!(
                    std::time::Instant::now() < deadline,
                    "written: {}",
                    written(&metrics)
                );
                std::thread::sleep(Duration::from_millis(10));
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        wait_for(1);
        let text = std::fs::read_to_string(&path).unwrap();
        let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(v["time"], "2023-11-14T22:13:20.123Z");
        assert_eq!(v["reason"], "no_route");
        assert_eq!(v["scopes_presented"][0], "orders:read");
        assert_eq!(v["route"], "GET /orders");
        assert_eq!(v["caller"], "spiffe://cluster.local/ns/shop/sa/frontend");
        assert_eq!(v["scope_required"], "orders:read");
        // logrotate: the file is moved away; the next lines go to a new file at the path.
        std::fs::rename(&path, dir.path().join("access.log.1")).unwrap();
        std::thread::sleep(Duration::from_millis(1100));
        log_one(&log, "first");
        std::thread::sleep(Duration::from_millis(1100));
        log_one(&log, "second");
        wait_for(3);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("\"second\""), "{text}");
        assert_eq!(metrics.access_log_dropped.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn sinks_parse() {
        assert_eq!("off".parse::<Sink>(), Ok(Sink::Off));
        assert_eq!("stderr".parse::<Sink>(), Ok(Sink::Stderr));
        assert_eq!(
            "/var/log/a.log".parse::<Sink>(),
            Ok(Sink::File("/var/log/a.log".into()))
        );
        assert!("".parse::<Sink>().is_err());
    }
}
