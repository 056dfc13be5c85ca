//! The one retry schedule of the workload side: capped exponential backoff with jitter, used by
//! the CA client's start-up retries, attestation, renewal, the watch-stream follower and the
//! token refresh. A pure value (no sleeping, no clock), so schedules are unit-tested directly.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// Start at `initial`, double each time, never over `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            next: initial.min(max),
        }
    }

    /// The wait before the next try (75–125 % of the current step, so a fleet does not retry
    /// in lockstep); the step then doubles up to the cap.
    pub fn next_delay(&mut self) -> Duration {
        let d = jitter(self.next);
        self.next = (self.next * 2).min(self.max);
        d
    }

    /// The step the next delay is drawn around (before jitter).
    pub fn step(&self) -> Duration {
        self.next
    }

    /// Lower the cap (e.g. to a fraction of the life an SVID has left); never below the start.
    pub fn cap(&mut self, max: Duration) {
        self.max = max.max(self.initial);
        self.next = self.next.min(self.max);
    }

    /// After a success: start over.
    pub fn reset(&mut self) {
        self.next = self.initial.min(self.max);
    }
}

/// 75–125 % of `d`.
pub fn jitter(d: Duration) -> Duration {
    let mut b = [0u8; 1];
    let _ = aws_lc_rs::rand::fill(&mut b);
    d.mul_f64(0.75 + f64::from(b[0]) / 510.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        let steps: Vec<Duration> = (0..8)
            .map(|_| {
                let s = b.step();
                let d = b.next_delay();
                assert!(
                    d >= s.mul_f64(0.75) && d <= s.mul_f64(1.25),
                    "{d:?} around {s:?}"
                );
                s
            })
            .collect();
        let ms: Vec<u128> = steps.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, [200, 400, 800, 1600, 3200, 5000, 5000, 5000]);
        b.reset();
        assert_eq!(b.step(), Duration::from_millis(200));
    }

    #[test]
    fn a_lower_cap_applies_at_once_but_never_below_the_start() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        for _ in 0..5 {
            b.next_delay();
        }
        assert_eq!(b.step(), Duration::from_secs(30));
        b.cap(Duration::from_secs(4));
        assert_eq!(b.step(), Duration::from_secs(4));
        b.cap(Duration::from_millis(10));
        assert_eq!(b.step(), Duration::from_secs(1));
    }
}
