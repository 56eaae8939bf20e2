//! Resident memory of this process beyond the mapped guest RAM.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// File and shmem pages resident before any guest RAM was mapped: the
/// binary and its libraries.
static BASELINE_KIB: OnceLock<u64> = OnceLock::new();

/// Records the baseline; call first thing in `main`.
pub fn record_baseline() {
    BASELINE_KIB
        .get_or_init(|| status_kib("RssFile:").unwrap_or(0) + status_kib("RssShmem:").unwrap_or(0));
}

/// Peak resident memory beyond guest RAM, sampled while a migration runs.
#[derive(Debug, Default)]
pub struct RssMeter {
    peak_overhead_kib: AtomicU64,
}

fn status_kib(field: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

impl RssMeter {
    /// Takes one cheap sample: anonymous memory (heap, stacks, buffers),
    /// which never includes guest RAM mapped from a file.
    pub fn sample(&self) {
        if let Some(anon) = status_kib("RssAnon:") {
            self.peak_overhead_kib.fetch_max(anon, Ordering::Relaxed);
        }
    }

    /// Peak overhead in MiB: the anonymous peak plus the file and shmem
    /// pages that were resident before guest RAM was mapped.
    pub fn peak_mib(&self) -> f64 {
        self.sample();
        let base = BASELINE_KIB.get().copied().unwrap_or(0);
        (self.peak_overhead_kib.load(Ordering::Relaxed) + base) as f64 / 1024.0
    }
}

/// Peak resident set of the process (VmHWM) in MiB.
pub fn vm_hwm_mib() -> f64 {
    status_kib("VmHWM:").unwrap_or(0) as f64 / 1024.0
}
