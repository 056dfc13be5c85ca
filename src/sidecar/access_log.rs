//! The access log of the callee's sidecar: one JSON line per request decision, with what an
//! auditor asks (who called whom, what, which rule decided, which scopes were needed and
//! shown, the outcome and its reason, the status, the latency, the trace). Never the token,
//! never the query string (either may carry secrets).
//!
//! Refusals are logged by default, allowed requests with `--access-log-allowed`. Off the hot
//! path: a request hands its entry to a bounded queue and goes on; one thread formats and
//! writes, flushing when the queue is empty. Should the writer fall behind (a slow disk), the
//! entries that do not fit are dropped and counted (`meshid_access_log_dropped_total`) rather
//! than slowing requests down. A log file renamed or removed (logrotate) is reopened within a
//! second; a write error (disk full) is counted and reported once, and logging resumes when
//! the disk has room again.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::{Duration, SystemTime};

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

/// One decision, as logged.
#[derive(Debug, Serialize)]
pub struct Entry {
    /// RFC 3339, UTC, milliseconds.
    pub time: String,
    /// The caller's SPIFFE ID (from its certificate), and its service name in the policy.
    pub caller: String,
    pub caller_service: Option<String>,
    /// This sidecar's SPIFFE ID and service name.
    pub callee: String,
    pub callee_service: Option<String>,
    pub method: String,
    /// The canonical path the decision was made on (no query string).
    pub path: String,
    /// The route rule that matched, as written (`GET /orders`), if any.
    pub route: Option<String>,
    pub scope_required: Option<String>,
    /// The scopes of the caller's verified token (empty when it showed none, or none verified).
    pub scopes_presented: Vec<String>,
    /// `allow` or `deny`.
    pub decision: &'static str,
    /// `allowed`, or the refusal reason (the `outcome` label of `meshid_requests_total`).
    pub reason: &'static str,
    pub status: u16,
    /// Until the response head was ready (the app's, for allowed requests), in milliseconds.
    pub latency_ms: f64,
    /// The W3C trace ID of the request, when it carried or started a trace.
    pub trace_id: Option<String>,
}

/// How many entries may wait for the writer before new ones are dropped.
const QUEUE: usize = 8192;

pub struct AccessLog {
    tx: Option<SyncSender<Entry>>,
    allowed: bool,
    metrics: Arc<Metrics>,
}

impl AccessLog {
    /// A log to `sink` (allowed requests too when `allowed`); starts the writer thread.
    pub fn start(sink: Sink, allowed: bool, metrics: Arc<Metrics>) -> std::io::Result<Self> {
        let tx = match sink {
            Sink::Off => None,
            Sink::Stderr => Some(spawn(Output::Stderr, metrics.clone())?),
            Sink::File(path) => {
                let file = open(&path)?;
                Some(spawn(Output::File { path, file }, metrics.clone())?)
            }
        };
        Ok(Self {
            tx,
            allowed,
            metrics,
        })
    }

    /// A log that logs nothing.
    pub fn off(metrics: Arc<Metrics>) -> Self {
        Self {
            tx: None,
            allowed: false,
            metrics,
        }
    }

    /// Whether a decision of this kind is logged: build its [`Entry`] only then.
    pub fn wants(&self, allowed: bool) -> bool {
        self.tx.is_some() && (!allowed || self.allowed)
    }

    pub fn log(&self, entry: Entry) {
        let Some(tx) = &self.tx else { return };
        match tx.try_send(entry) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.metrics
                    .access_log_dropped
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// `SystemTime` as RFC 3339 in UTC with milliseconds.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
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

fn spawn(out: Output, metrics: Arc<Metrics>) -> std::io::Result<SyncSender<Entry>> {
    let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
    std::thread::Builder::new()
        .name("access-log".into())
        .spawn(move || write_forever(out, rx, &metrics))?;
    Ok(tx)
}

/// The writer thread: until every sender is gone.
fn write_forever(mut out: Output, rx: Receiver<Entry>, metrics: &Metrics) {
    let mut line = Vec::with_capacity(512);
    let mut failing = false;
    let mut writer = writer_for(&out);
    let mut checked = std::time::Instant::now();
    loop {
        let entry = match rx.try_recv() {
            Ok(e) => Some(e),
            Err(_) => {
                // Nothing waiting: what is buffered goes out now.
                flush(&mut writer, &out, &mut failing, metrics);
                match rx.recv_timeout(Duration::from_secs(1)) {
                    Ok(e) => Some(e),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => {
                        flush(&mut writer, &out, &mut failing, metrics);
                        return;
                    }
                }
            }
        };
        if checked.elapsed() >= Duration::from_secs(1) {
            checked = std::time::Instant::now();
            if let Some(reopened) = reopen_if_moved(&out) {
                flush(&mut writer, &out, &mut failing, metrics);
                out = reopened;
                writer = writer_for(&out);
            }
        }
        let Some(entry) = entry else { continue };
        line.clear();
        if serde_json::to_writer(&mut line, &entry).is_err() {
            continue;
        }
        line.push(b'\n');
        match writer.write_all(&line) {
            Ok(()) => {
                metrics.access_log_lines.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                write_failed(&mut failing, metrics, &e);
                discard(&mut writer, &out);
            }
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

fn flush(w: &mut BufWriter<Box<dyn Write>>, out: &Output, failing: &mut bool, metrics: &Metrics) {
    match w.flush() {
        Ok(()) => {
            if *failing {
                *failing = false;
                tracing::info!("access log: writing again");
            }
        }
        Err(e) => {
            write_failed(failing, metrics, &e);
            discard(w, out);
        }
    }
}

/// Drop what is buffered (a full disk must not hold the writer up for ever) and start again.
fn discard(w: &mut BufWriter<Box<dyn Write>>, out: &Output) {
    let old = std::mem::replace(w, writer_for(out));
    let _ = old.into_parts();
}

fn writer_for(out: &Output) -> BufWriter<Box<dyn Write>> {
    BufWriter::with_capacity(64 * 1024, sink(out))
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

    fn entry(reason: &'static str) -> Entry {
        Entry {
            time: rfc3339(SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123)),
            caller: "spiffe://cluster.local/ns/shop/sa/frontend".into(),
            caller_service: Some("frontend".into()),
            callee: "spiffe://cluster.local/ns/shop/sa/orders".into(),
            callee_service: Some("orders".into()),
            method: "GET".into(),
            path: "/orders/7".into(),
            route: Some("GET /orders".into()),
            scope_required: Some("orders:read".into()),
            scopes_presented: vec!["orders:read".into()],
            decision: "deny",
            reason,
            status: 403,
            latency_ms: 0.25,
            trace_id: None,
        }
    }

    #[test]
    fn lines_are_json_and_follow_a_rotated_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let metrics = Arc::new(Metrics::default());
        let log = AccessLog::start(Sink::File(path.clone()), false, metrics.clone()).unwrap();
        assert!(log.wants(false) && !log.wants(true), "refusals only");
        log.log(entry("no_route"));
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
        // logrotate: the file is moved away; the next lines go to a new file at the path.
        std::fs::rename(&path, dir.path().join("access.log.1")).unwrap();
        std::thread::sleep(Duration::from_millis(1100));
        log.log(entry("first"));
        std::thread::sleep(Duration::from_millis(1100));
        log.log(entry("second"));
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
