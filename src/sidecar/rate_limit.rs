//! Per-caller request rate limits, enforced by the callee's sidecar.
//!
//! The policy gives a caller `rate: 200/s, burst: 50`; every request from that caller's
//! identity takes one cell of a generic cell rate algorithm (GCRA, the token bucket in one
//! timestamp): the theoretical arrival time moves one interval per request, and a request
//! that would push it more than `burst - 1` intervals past now is refused with the time until
//! one would be admitted. One atomic per caller, no timer and no lock on the way through; a
//! caller without a limit costs one map lookup in the directory. Limits are per callee pod,
//! as Envoy's local rate limit is.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use meshid_proto::directory::RateLimit;

pub struct RateLimiter {
    epoch: Instant,
    callers: RwLock<HashMap<String, Arc<Cell>>>,
}

struct Cell {
    limit: RateLimit,
    /// Theoretical arrival time of the next request, nanoseconds since `epoch`.
    tat: AtomicU64,
}

impl Default for RateLimiter {
    fn default() -> Self {
        Self {
            epoch: Instant::now(),
            callers: RwLock::default(),
        }
    }
}

impl RateLimiter {
    /// Admit one request of `caller` held to `limit`, or say how long until one would be. A
    /// limit that changed (a policy reload) starts its caller afresh, with a full burst.
    pub fn admit(&self, caller: &str, limit: RateLimit, now: Instant) -> Result<(), Duration> {
        let cell = self.cell(caller, limit);
        let interval = u64::try_from(limit.interval().as_nanos())
            .unwrap_or(u64::MAX)
            .max(1);
        let tolerance = interval.saturating_mul(u64::from(limit.burst.max(1) - 1));
        let now =
            u64::try_from(now.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX);
        let mut tat = cell.tat.load(Ordering::Relaxed);
        loop {
            let start = tat.max(now);
            let ahead = start - now;
            if ahead > tolerance {
                return Err(Duration::from_nanos(ahead - tolerance));
            }
            match cell.tat.compare_exchange_weak(
                tat,
                start.saturating_add(interval),
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(()),
                Err(current) => tat = current,
            }
        }
    }

    fn cell(&self, caller: &str, limit: RateLimit) -> Arc<Cell> {
        if let Some(c) = self
            .callers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(caller)
            .filter(|c| c.limit == limit)
        {
            return c.clone();
        }
        let mut callers = self.callers.write().unwrap_or_else(|p| p.into_inner());
        let cell = callers
            .entry(caller.to_owned())
            .or_insert_with(|| Arc::new(Cell::new(limit)));
        if cell.limit != limit {
            *cell = Arc::new(Cell::new(limit));
        }
        cell.clone()
    }
}

impl Cell {
    fn new(limit: RateLimit) -> Self {
        Self {
            limit,
            tat: AtomicU64::new(0),
        }
    }
}

/// `Retry-After` in whole seconds (RFC 9110 §10.2.3), rounded up: at least 1.
pub fn retry_after_seconds(wait: Duration) -> u64 {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(rate: &str, burst: u32) -> RateLimit {
        RateLimit::parse(rate, Some(burst)).unwrap()
    }

    #[test]
    fn a_burst_then_the_sustained_rate() {
        let l = RateLimiter::default();
        let t0 = Instant::now() + Duration::from_secs(1);
        let ten = limit("10/s", 5);
        for i in 0..5 {
            assert_eq!(l.admit("frontend", ten, t0), Ok(()), "burst request {i}");
        }
        let wait = l.admit("frontend", ten, t0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(100), "one interval at 10/s");
        // Another caller has a bucket of its own.
        assert_eq!(l.admit("billing", ten, t0), Ok(()));
        // One interval later one more, not two.
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!(l.admit("frontend", ten, t1), Ok(()));
        assert!(l.admit("frontend", ten, t1).is_err());
        // Over a quiet second the burst refills, and no further.
        let t2 = t1 + Duration::from_secs(5);
        for _ in 0..5 {
            assert_eq!(l.admit("frontend", ten, t2), Ok(()));
        }
        assert!(l.admit("frontend", ten, t2).is_err());
    }

    #[test]
    fn a_changed_limit_starts_afresh() {
        let l = RateLimiter::default();
        let t0 = Instant::now() + Duration::from_secs(1);
        let one = limit("1/m", 1);
        assert_eq!(l.admit("frontend", one, t0), Ok(()));
        let wait = l.admit("frontend", one, t0).unwrap_err();
        assert_eq!(wait, Duration::from_secs(60));
        assert_eq!(retry_after_seconds(wait), 60);
        assert_eq!(l.admit("frontend", limit("100/s", 100), t0), Ok(()));
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_after_seconds(Duration::from_millis(5)), 1);
        assert_eq!(retry_after_seconds(Duration::from_secs(2)), 2);
        assert_eq!(retry_after_seconds(Duration::from_millis(2001)), 3);
    }
}
