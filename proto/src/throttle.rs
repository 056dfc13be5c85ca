//! Throttled log lines: per key (a peer and a reason), the first line of a window is logged and
//! its repeats are counted; the next line after the window says how many were left out. A
//! caller that sends a flood of refused requests cannot turn it into a flood of WARN lines.
//! Bounded: at most `max_keys` keys are remembered; beyond that, new keys share one.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Whether to log this occurrence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Log it; `suppressed` repeats of this key were left out since the last line.
    Log { suppressed: u64 },
    /// A repeat within the window: log it at a lower level, or not at all.
    Quiet,
}

struct Slot {
    since: Instant,
    suppressed: u64,
}

pub struct Throttle {
    window: Duration,
    max_keys: usize,
    slots: Mutex<HashMap<String, Slot>>,
}

const OVERFLOW_KEY: &str = "\u{0}overflow";

impl Throttle {
    pub fn new(window: Duration, max_keys: usize) -> Self {
        Self {
            window,
            max_keys: max_keys.max(1),
            slots: Mutex::new(HashMap::new()),
        }
    }

    pub fn check(&self, key: &str, now: Instant) -> Verdict {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        if !slots.contains_key(key) && slots.len() >= self.max_keys {
            let window = self.window;
            slots.retain(|_, s| now.duration_since(s.since) < window);
        }
        let key = if slots.contains_key(key) || slots.len() < self.max_keys {
            key
        } else {
            OVERFLOW_KEY
        };
        match slots.get_mut(key) {
            Some(s) if now.duration_since(s.since) < self.window => {
                s.suppressed += 1;
                Verdict::Quiet
            }
            Some(s) => {
                let suppressed = s.suppressed;
                *s = Slot {
                    since: now,
                    suppressed: 0,
                };
                Verdict::Log { suppressed }
            }
            None => {
                slots.insert(
                    key.to_owned(),
                    Slot {
                        since: now,
                        suppressed: 0,
                    },
                );
                Verdict::Log { suppressed: 0 }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_key_per_window_and_the_next_says_how_many_were_left_out() {
        let t = Throttle::new(Duration::from_secs(10), 100);
        let t0 = Instant::now();
        assert_eq!(t.check("a|no_token", t0), Verdict::Log { suppressed: 0 });
        for i in 1..=1000 {
            assert_eq!(
                t.check("a|no_token", t0 + Duration::from_millis(i)),
                Verdict::Quiet
            );
        }
        assert_eq!(t.check("b|no_token", t0), Verdict::Log { suppressed: 0 });
        assert_eq!(
            t.check("a|no_token", t0 + Duration::from_secs(11)),
            Verdict::Log { suppressed: 1000 }
        );
    }

    #[test]
    fn it_stays_bounded_under_many_keys() {
        let t = Throttle::new(Duration::from_secs(10), 50);
        let t0 = Instant::now();
        for i in 0..10_000 {
            t.check(&format!("peer{i}|x"), t0);
        }
        assert!(t.slots.lock().unwrap().len() <= 51);
        // New keys beyond the bound share one slot: one line, the rest quiet.
        assert_eq!(t.check("another|x", t0), Verdict::Quiet);
        // Once the window passes, old keys make room again.
        assert_eq!(
            t.check("another|x", t0 + Duration::from_secs(11)),
            Verdict::Log { suppressed: 0 }
        );
    }
}
