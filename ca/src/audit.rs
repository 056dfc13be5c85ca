//! The audit log: one JSON line per issuance and per refusal — who, what, when, why — written
//! (flushed to the kernel) before the reply leaves. Never a key or a token: records are built
//! from IDs, serials and reasons only.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
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
        }
    }
}

/// Append-only JSON-lines sink, shared by every request handler.
#[derive(Clone)]
pub struct Audit {
    file: Arc<Mutex<File>>,
}

impl Audit {
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)?;
        Ok(Self {
            file: Arc::new(Mutex::new(file)),
        })
    }

    /// Write one record. Blocking: call from `spawn_blocking` in async code.
    pub fn write(&self, record: &AuditRecord) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(record).expect("audit records serialize");
        line.push(b'\n');
        let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
        // One write(2) with O_APPEND: lines from concurrent writers never interleave.
        f.write_all(&line)
    }
}
