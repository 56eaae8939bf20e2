//! Live counters (for progress bars) and the final statistics of a migration.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Counters updated by every thread of a migration; read them from any
/// thread to draw progress.
#[derive(Debug, Default)]
pub struct Progress {
    /// Bytes written or read on all channels (headers included).
    pub bytes: AtomicU64,
    /// Pages sent or received as data.
    pub normal_pages: AtomicU64,
    /// Pages sent or received as zero pages.
    pub zero_pages: AtomicU64,
    /// Sync rounds completed.
    pub rounds: AtomicU64,
    /// Pages the current round is expected to move (0 when unknown).
    pub planned_pages: AtomicU64,
}

impl Progress {
    pub(crate) fn add(&self, counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Pages done so far (normal + zero).
    pub fn pages_done(&self) -> u64 {
        self.normal_pages.load(Ordering::Relaxed) + self.zero_pages.load(Ordering::Relaxed)
    }

    /// A snapshot of the counters with the elapsed time.
    pub fn stats(&self, duration: Duration) -> Stats {
        let bytes = self.bytes.load(Ordering::Relaxed);
        let secs = duration.as_secs_f64();
        Stats {
            bytes,
            normal_pages: self.normal_pages.load(Ordering::Relaxed),
            zero_pages: self.zero_pages.load(Ordering::Relaxed),
            rounds: self.rounds.load(Ordering::Relaxed),
            duration_s: secs,
            throughput_mib_s: if secs > 0.0 {
                bytes as f64 / secs / (1024.0 * 1024.0)
            } else {
                0.0
            },
        }
    }
}

/// Final figures of one migration.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Stats {
    /// Bytes moved on all channels.
    pub bytes: u64,
    /// Data pages.
    pub normal_pages: u64,
    /// Zero pages.
    pub zero_pages: u64,
    /// Sync rounds (flush points).
    pub rounds: u64,
    /// Wall time of the migration.
    pub duration_s: f64,
    /// `bytes / duration`, MiB/s.
    pub throughput_mib_s: f64,
}
