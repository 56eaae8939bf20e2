//! Resident memory of this process beyond the mapped guest RAM.

use std::sync::atomic::{AtomicU64, Ordering};

/// Peak of `VmRSS - resident pages of the RAM mappings`, sampled.
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

/// Sum of `Rss:` of the mappings starting at `addrs`.
fn mappings_rss_kib(addrs: &[usize]) -> u64 {
    let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") else {
        return 0;
    };
    let mut total = 0;
    let mut inside = false;
    for line in smaps.lines() {
        if let Some((range, _)) = line.split_once(' ')
            && let Some((start, _)) = range.split_once('-')
            && let Ok(start) = usize::from_str_radix(start, 16)
            && range.contains('-')
            && !line.starts_with(|c: char| c.is_ascii_uppercase())
        {
            inside = addrs.contains(&start);
            continue;
        }
        if inside && let Some(v) = line.strip_prefix("Rss:") {
            total += v.trim().trim_end_matches("kB").trim().parse::<u64>().unwrap_or(0);
        }
    }
    total
}

impl RssMeter {
    /// Takes one sample with the RAM mappings at `addrs`.
    pub fn sample(&self, addrs: &[usize]) {
        let (Some(rss), ram) = (status_kib("VmRSS:"), mappings_rss_kib(addrs)) else {
            return;
        };
        self.peak_overhead_kib
            .fetch_max(rss.saturating_sub(ram), Ordering::Relaxed);
    }

    /// Peak overhead in MiB.
    pub fn peak_mib(&self) -> f64 {
        self.peak_overhead_kib.load(Ordering::Relaxed) as f64 / 1024.0
    }
}

/// Peak resident set of the process (VmHWM) in MiB.
pub fn vm_hwm_mib() -> f64 {
    status_kib("VmHWM:").unwrap_or(0) as f64 / 1024.0
}
