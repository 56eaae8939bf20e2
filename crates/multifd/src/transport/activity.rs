//! What a connection is doing, for the idle watchdog: how many bytes it has
//! moved, and since when it has been waiting in a blocking call.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// `waiting_since_ms` when no blocking call is in progress.
const NOT_WAITING: u64 = u64::MAX;

/// Bytes moved by one connection and whether it is blocked now. Shared
/// (`Arc`) between the connection and whoever watches it.
#[derive(Debug)]
pub(crate) struct Activity {
    bytes: AtomicU64,
    /// Milliseconds after `epoch` when the current blocking call began.
    waiting_since_ms: AtomicU64,
    epoch: Instant,
}

impl Default for Activity {
    fn default() -> Self {
        Self {
            bytes: AtomicU64::new(0),
            waiting_since_ms: AtomicU64::new(NOT_WAITING),
            epoch: Instant::now(),
        }
    }
}

impl Activity {
    /// Records `n` bytes moved.
    pub(crate) fn moved(&self, n: usize) {
        self.bytes.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Bytes moved so far.
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Runs `call` (one blocking system call) marked as waiting.
    pub(crate) fn waiting<T>(&self, call: impl FnOnce() -> T) -> T {
        let now = self.epoch.elapsed().as_millis() as u64;
        self.waiting_since_ms.store(now, Ordering::Relaxed);
        let out = call();
        self.waiting_since_ms.store(NOT_WAITING, Ordering::Relaxed);
        out
    }

    /// How long the blocking call in progress has been waiting, if any.
    pub(crate) fn waiting_for(&self) -> Option<Duration> {
        match self.waiting_since_ms.load(Ordering::Relaxed) {
            NOT_WAITING => None,
            since => {
                let now = self.epoch.elapsed().as_millis() as u64;
                Some(Duration::from_millis(now.saturating_sub(since)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waiting_is_marked_only_during_the_call() {
        let a = Activity::default();
        assert_eq!(a.waiting_for(), None);
        let inside = a.waiting(|| a.waiting_for());
        assert!(inside.is_some());
        assert_eq!(a.waiting_for(), None);
        a.moved(5);
        a.moved(7);
        assert_eq!(a.bytes(), 12);
    }
}
