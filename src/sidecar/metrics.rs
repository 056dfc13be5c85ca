//! The sidecar's Prometheus metrics: a handful of counters and gauges, written out in the text
//! exposition format by hand (no registry needed for this few).

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// What became of a proxied request: the `direction` and `outcome` labels of
/// `meshid_requests_total`. A fixed set, so counting is one atomic add with no lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    InboundAllowed,
    InboundTlsRefused,
    InboundBadPath,
    InboundNoDirectory,
    InboundNotAService,
    InboundCallerNotAllowed,
    InboundNoRoute,
    InboundNoToken,
    InboundInvalidToken,
    InboundTokenExpired,
    InboundTokenCnfMismatch,
    InboundInsufficientScope,
    OutboundForwarded,
    OutboundNoDirectory,
    OutboundUnknownService,
    OutboundUpstreamError,
    OutboundTunnel,
    OutboundTunnelRefused,
    OutboundNotInMesh,
    OutboundPassthrough,
    OutboundMisdirected,
    InboundTunnelAllowed,
    InboundTunnelRefused,
    InboundRevoked,
    InboundRateLimited,
}

impl Outcome {
    const ALL: [Outcome; 25] = [
        Outcome::InboundAllowed,
        Outcome::InboundTlsRefused,
        Outcome::InboundBadPath,
        Outcome::InboundNoDirectory,
        Outcome::InboundNotAService,
        Outcome::InboundCallerNotAllowed,
        Outcome::InboundNoRoute,
        Outcome::InboundNoToken,
        Outcome::InboundInvalidToken,
        Outcome::InboundTokenExpired,
        Outcome::InboundTokenCnfMismatch,
        Outcome::InboundInsufficientScope,
        Outcome::OutboundForwarded,
        Outcome::OutboundNoDirectory,
        Outcome::OutboundUnknownService,
        Outcome::OutboundUpstreamError,
        Outcome::OutboundTunnel,
        Outcome::OutboundTunnelRefused,
        Outcome::OutboundNotInMesh,
        Outcome::OutboundPassthrough,
        Outcome::OutboundMisdirected,
        Outcome::InboundTunnelAllowed,
        Outcome::InboundTunnelRefused,
        Outcome::InboundRevoked,
        Outcome::InboundRateLimited,
    ];

    /// `(direction, outcome)` label values.
    pub fn labels(self) -> (&'static str, &'static str) {
        use Outcome::*;
        match self {
            InboundAllowed => ("inbound", "allowed"),
            InboundTlsRefused => ("inbound", "tls_refused"),
            InboundBadPath => ("inbound", "bad_path"),
            InboundNoDirectory => ("inbound", "no_directory"),
            InboundNotAService => ("inbound", "not_a_service"),
            InboundCallerNotAllowed => ("inbound", "caller_not_allowed"),
            InboundNoRoute => ("inbound", "no_route"),
            InboundNoToken => ("inbound", "no_token"),
            InboundInvalidToken => ("inbound", "invalid_token"),
            InboundTokenExpired => ("inbound", "token_expired"),
            InboundTokenCnfMismatch => ("inbound", "token_cnf_mismatch"),
            InboundRevoked => ("inbound", "revoked"),
            InboundRateLimited => ("inbound", "rate_limited"),
            InboundInsufficientScope => ("inbound", "insufficient_scope"),
            OutboundForwarded => ("outbound", "forwarded"),
            OutboundNoDirectory => ("outbound", "no_directory"),
            OutboundUnknownService => ("outbound", "unknown_service"),
            OutboundUpstreamError => ("outbound", "upstream_error"),
            OutboundTunnel => ("outbound", "tunnel"),
            OutboundTunnelRefused => ("outbound", "tunnel_refused"),
            OutboundNotInMesh => ("outbound", "not_in_mesh"),
            OutboundPassthrough => ("outbound", "passthrough"),
            OutboundMisdirected => ("outbound", "misdirected"),
            InboundTunnelAllowed => ("inbound", "tunnel_allowed"),
            InboundTunnelRefused => ("inbound", "tunnel_refused"),
        }
    }
}

#[derive(Default)]
pub struct Metrics {
    pub svid_expiry_unix: AtomicI64,
    pub renewals: AtomicU64,
    pub renewal_failures: AtomicU64,
    pub reloads: AtomicU64,
    pub reload_refusals: AtomicU64,
    /// Renewed SVIDs that could not be written to the cert directory.
    pub svid_write_failures: AtomicU64,
    /// Steps of the wall clock against the monotonic one, seen by the renewal schedule.
    pub clock_steps: AtomicU64,
    pub token_cache_hits: AtomicU64,
    pub token_cache_misses: AtomicU64,
    pub access_log_lines: AtomicU64,
    pub access_log_dropped: AtomicU64,
    pub access_log_errors: AtomicU64,
    /// Requests refused by a rate limit, per calling service (only callers with a limit).
    pub rate_limited: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
    /// Workload API calls by RPC and outcome (`ok` or the refusal's gRPC code).
    pub workload_api:
        std::sync::Mutex<std::collections::BTreeMap<(&'static str, &'static str), u64>>,
    /// One counter per [`Outcome`], in declaration order.
    requests: [AtomicU64; Outcome::ALL.len()],
    /// What the bounds of each listener did (timeouts, connection cap).
    pub listeners: meshid_proto::serve::ListenerStats,
}

impl Metrics {
    pub fn request(&self, outcome: Outcome) {
        self.requests[outcome as usize].fetch_add(1, Ordering::Relaxed);
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
                "meshid_svid_write_failures_total",
                "Renewed SVIDs in use that could not be written to the cert directory.",
                &self.svid_write_failures,
            ),
            (
                "meshid_clock_steps_total",
                "Steps of the wall clock (30 s or more against the monotonic clock) seen by the renewal schedule.",
                &self.clock_steps,
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
            (
                "meshid_access_log_lines_total",
                "Access log lines written.",
                &self.access_log_lines,
            ),
            (
                "meshid_access_log_dropped_total",
                "Access log entries dropped because the writer was behind.",
                &self.access_log_dropped,
            ),
            (
                "meshid_access_log_errors_total",
                "Access log writes that failed (a full disk, say).",
                &self.access_log_errors,
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
        // Every outcome, zeros included, so rate() and alerts work from the first scrape.
        for outcome in Outcome::ALL {
            let (direction, label) = outcome.labels();
            let _ = writeln!(
                out,
                "meshid_requests_total{{direction=\"{direction}\",outcome=\"{label}\"}} {}",
                self.requests[outcome as usize].load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP meshid_rate_limited_total Requests refused by the policy's rate limit, per caller.\n# TYPE meshid_rate_limited_total counter"
        );
        for (caller, n) in self
            .rate_limited
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = writeln!(out, "meshid_rate_limited_total{{caller=\"{caller}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "# HELP meshid_workload_api_calls_total SPIFFE Workload API calls, by RPC and outcome.\n# TYPE meshid_workload_api_calls_total counter"
        );
        for ((rpc, outcome), n) in self
            .workload_api
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "meshid_workload_api_calls_total{{rpc=\"{rpc}\",outcome=\"{outcome}\"}} {n}"
            );
        }
        self.listeners.render(&mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_outcome_is_exported_and_counted_under_its_labels() {
        let m = Metrics::default();
        m.request(Outcome::InboundAllowed);
        m.request(Outcome::InboundAllowed);
        m.request(Outcome::InboundTokenCnfMismatch);
        let text = m.render(0);
        assert!(
            text.contains("meshid_requests_total{direction=\"inbound\",outcome=\"allowed\"} 2\n")
        );
        assert!(text.contains(
            "meshid_requests_total{direction=\"inbound\",outcome=\"token_cnf_mismatch\"} 1\n"
        ));
        // Outcomes not seen yet are there with 0, so a rate() has a starting point.
        assert!(text.contains(
            "meshid_requests_total{direction=\"outbound\",outcome=\"upstream_error\"} 0\n"
        ));
        let lines = text
            .lines()
            .filter(|l| l.starts_with("meshid_requests_total{"))
            .count();
        assert_eq!(lines, Outcome::ALL.len());
        // ALL is in declaration order (the counter index) and each label pair appears once.
        for (i, o) in Outcome::ALL.iter().enumerate() {
            assert_eq!(*o as usize, i, "{o:?}");
        }
        let mut labels: Vec<_> = Outcome::ALL.iter().map(|o| o.labels()).collect();
        labels.sort();
        labels.dedup();
        assert_eq!(labels.len(), Outcome::ALL.len());
    }
}
