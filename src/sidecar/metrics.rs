//! The sidecar's Prometheus metrics: a handful of counters and gauges, written out in the text
//! exposition format by hand (no registry needed for this few).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

#[derive(Default)]
pub struct Metrics {
    pub svid_expiry_unix: AtomicI64,
    pub renewals: AtomicU64,
    pub renewal_failures: AtomicU64,
    pub reloads: AtomicU64,
    pub reload_refusals: AtomicU64,
    pub token_cache_hits: AtomicU64,
    pub token_cache_misses: AtomicU64,
    /// (direction, outcome) -> count; outcome is "allowed" or a denial reason.
    requests: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
}

impl Metrics {
    pub fn request(&self, direction: &'static str, outcome: &'static str) {
        *self
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((direction, outcome))
            .or_default() += 1;
    }

    pub fn render(&self, now_unix: i64) -> String {
        let mut out = String::new();
        let g = |v: &AtomicU64| v.load(Ordering::Relaxed);
        let expiry = self.svid_expiry_unix.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "# HELP meshid_svid_expiry_seconds Seconds until the current SVID expires."
        );
        let _ = writeln!(out, "# TYPE meshid_svid_expiry_seconds gauge");
        let _ = writeln!(
            out,
            "meshid_svid_expiry_seconds {}",
            if expiry > 0 { expiry - now_unix } else { 0 }
        );
        for (name, help, v) in [
            (
                "meshid_svid_renewals_total",
                "SVID renewals that succeeded.",
                &self.renewals,
            ),
            (
                "meshid_svid_renewal_failures_total",
                "SVID renewal attempts that failed.",
                &self.renewal_failures,
            ),
            (
                "meshid_svid_reloads_total",
                "Certificates loaded from files replaced on disk.",
                &self.reloads,
            ),
            (
                "meshid_svid_reload_refusals_total",
                "Replaced certificate files refused.",
                &self.reload_refusals,
            ),
            (
                "meshid_token_cache_hits_total",
                "Outbound calls served with a cached token.",
                &self.token_cache_hits,
            ),
            (
                "meshid_token_cache_misses_total",
                "Outbound calls that needed a new token.",
                &self.token_cache_misses,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                g(v)
            );
        }
        let _ = writeln!(
            out,
            "# HELP meshid_requests_total Requests by direction and outcome (allowed or the denial reason)."
        );
        let _ = writeln!(out, "# TYPE meshid_requests_total counter");
        for ((direction, outcome), n) in self
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "meshid_requests_total{{direction=\"{direction}\",outcome=\"{outcome}\"}} {n}"
            );
        }
        out
    }
}
