//! Changes in a directory, for the files that are reloaded while running (the CA's policy,
//! the sidecar's certificate files): file-system events where the platform has them, and a poll
//! every 2 s always, so a missed event (or no watcher at all) only delays a reload. Callers
//! compare what they read with what they hold; a wake-up is a hint, not a promise.

use std::path::Path;
use std::time::Duration;

use notify::Watcher;
use tokio::sync::mpsc;

const POLL: Duration = Duration::from_secs(2);
/// Let a burst of events (key then certificate, write then rename, a symlink swap) settle.
const SETTLE: Duration = Duration::from_millis(200);

pub struct DirWatch {
    /// Dropping it stops the events.
    _watcher: Option<notify::RecommendedWatcher>,
    events: mpsc::Receiver<()>,
    poll: tokio::time::Interval,
}

impl DirWatch {
    /// Watch `dir` (not recursively). `what` names it in the warning when only polling is
    /// possible. Call inside a tokio runtime.
    pub fn new(dir: &Path, what: &str) -> Self {
        let (tx, events) = mpsc::channel::<()>(16);
        let watcher = notify::recommended_watcher(move |_: notify::Result<notify::Event>| {
            let _ = tx.try_send(());
        })
        .and_then(|mut w| {
            w.watch(dir, notify::RecursiveMode::NonRecursive)
                .map(|()| w)
        });
        let watcher = match watcher {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(
                    "watching {} for {what} failed ({e}); polling every 2 s",
                    dir.display()
                );
                None
            }
        };
        Self {
            _watcher: watcher,
            events,
            poll: tokio::time::interval(POLL),
        }
    }

    /// Resolves when something in the directory may have changed (the first call returns at
    /// once: the poll's first tick).
    pub async fn changed(&mut self) {
        tokio::select! {
            Some(()) = self.events.recv() => {
                tokio::time::sleep(SETTLE).await;
                while self.events.try_recv().is_ok() {}
            }
            _ = self.poll.tick() => {}
        }
    }
}
