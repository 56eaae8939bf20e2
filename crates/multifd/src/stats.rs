//! Live counters (for progress bars), a `query-migrate`-shaped snapshot of
//! a running migration, and the final statistics of a migration.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Counters updated by every thread of a migration; read them from any
/// thread to draw progress, or take a [`MigrationInfo`] with
/// [`Progress::query`].
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
    live: Live,
}

/// What only a live source fills in (all zero on a destination).
#[derive(Debug, Default)]
struct Live {
    status: AtomicU8,
    started: OnceLock<Instant>,
    /// Set when the migration ended (success or failure), µs after start.
    total_us: AtomicU64,
    setup_us: AtomicU64,
    expected_downtime_us: AtomicU64,
    remaining_pages: AtomicU64,
    dirty_pages_rate: AtomicU64,
    bandwidth: AtomicU64,
    dirty_syncs: AtomicU64,
    downtime_us: AtomicU64,
    throttle: AtomicU64,
    downtime_limit_us: AtomicU64,
}

/// Where a migration is (QEMU's `MigrationStatus`, the states a source of
/// ours goes through).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum MigrationStatus {
    /// Not started.
    None,
    /// Connecting, sending the block list.
    Setup,
    /// Iterating: the VM runs, dirty pages are being sent.
    Active,
    /// Switchover: the VM is paused, the last pages and the device state
    /// are going out (QEMU's `device`).
    Device,
    /// Done; the destination has everything.
    Completed,
    /// Failed (the VM runs again on the source).
    Failed,
    /// Cancelled (the VM runs again on the source).
    Cancelled,
}

impl MigrationStatus {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::Setup,
            2 => Self::Active,
            3 => Self::Device,
            4 => Self::Completed,
            5 => Self::Failed,
            6 => Self::Cancelled,
            _ => Self::None,
        }
    }
    fn to_u8(self) -> u8 {
        match self {
            Self::None => 0,
            Self::Setup => 1,
            Self::Active => 2,
            Self::Device => 3,
            Self::Completed => 4,
            Self::Failed => 5,
            Self::Cancelled => 6,
        }
    }
}

/// A snapshot of a migration, shaped like QEMU's `query-migrate` answer
/// (names and units as there: milliseconds, bytes, pages per second,
/// megabits per second).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationInfo {
    /// Where the migration is.
    pub status: MigrationStatus,
    /// Time since the start, or the whole migration once it ended.
    pub total_time: u64,
    /// Downtime a switchover would take now, as estimated from the dirty
    /// pages, the measured bandwidth and the measured fixed costs.
    pub expected_downtime: u64,
    /// Time from the start until round 1 began (connections, block list).
    pub setup_time: u64,
    /// Bytes sent so far (all channels, main stream included).
    pub transferred: u64,
    /// Bytes dirty at the last sync and not yet sent.
    pub remaining: u64,
    /// Pages dirtied per second, measured between the last two syncs.
    pub dirty_pages_rate: u64,
    /// Bandwidth measured over the last round, megabits per second.
    pub mbps: f64,
    /// Dirty-log syncs (QEMU's `dirty-sync-count`).
    pub dirty_sync_count: u64,
    /// VM paused until the stream was complete, once the migration
    /// completed (QEMU's `downtime`); `None` before.
    pub downtime: Option<u64>,
    /// vCPU throttle of auto-converge, percent (QEMU's
    /// `cpu-throttle-percentage`).
    pub cpu_throttle_percentage: u64,
    /// The downtime limit in force (it grows with a downtime ramp).
    pub downtime_limit: u64,
    /// Rounds (sync points) completed.
    pub rounds: u64,
}

fn us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
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

    /// Where a live migration stands, callable from any thread while it
    /// runs (QEMU's `query-migrate`). On a destination only the counters
    /// (`transferred`, `rounds`) are filled in.
    pub fn query(&self) -> MigrationInfo {
        let l = &self.live;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let status = MigrationStatus::from_u8(l.status.load(Ordering::Acquire));
        let ended = matches!(
            status,
            MigrationStatus::Completed | MigrationStatus::Failed | MigrationStatus::Cancelled
        );
        let total_us = match (ended, l.started.get()) {
            (true, _) => get(&l.total_us),
            (false, Some(t)) => us(t.elapsed()),
            (false, None) => 0,
        };
        MigrationInfo {
            status,
            total_time: total_us / 1000,
            expected_downtime: get(&l.expected_downtime_us) / 1000,
            setup_time: get(&l.setup_us) / 1000,
            transferred: get(&self.bytes),
            remaining: get(&l.remaining_pages) * 4096,
            dirty_pages_rate: get(&l.dirty_pages_rate),
            mbps: get(&l.bandwidth) as f64 * 8.0 / 1e6,
            dirty_sync_count: get(&l.dirty_syncs),
            downtime: (status == MigrationStatus::Completed).then(|| get(&l.downtime_us) / 1000),
            cpu_throttle_percentage: get(&l.throttle),
            downtime_limit: get(&l.downtime_limit_us) / 1000,
            rounds: get(&self.rounds),
        }
    }

    /// Downtime of a completed migration, with microseconds (`None`
    /// before it completed).
    pub fn downtime(&self) -> Option<Duration> {
        (MigrationStatus::from_u8(self.live.status.load(Ordering::Acquire))
            == MigrationStatus::Completed)
            .then(|| Duration::from_micros(self.live.downtime_us.load(Ordering::Relaxed)))
    }

    pub(crate) fn set_status(&self, s: MigrationStatus) {
        let l = &self.live;
        if s == MigrationStatus::Setup {
            let _ = l.started.set(Instant::now());
        }
        if matches!(
            s,
            MigrationStatus::Completed | MigrationStatus::Failed | MigrationStatus::Cancelled
        ) && let Some(t) = l.started.get()
        {
            l.total_us.store(us(t.elapsed()), Ordering::Relaxed);
        }
        l.status.store(s.to_u8(), Ordering::Release);
    }

    pub(crate) fn set_setup_time(&self, d: Duration) {
        self.live.setup_us.store(us(d), Ordering::Relaxed);
    }

    /// What the driver learnt at a dirty sync.
    pub(crate) fn set_sync(&self, s: SyncFigures) {
        let l = &self.live;
        l.dirty_syncs.fetch_add(1, Ordering::Relaxed);
        l.remaining_pages
            .store(s.remaining_pages, Ordering::Relaxed);
        l.expected_downtime_us
            .store(us(s.expected_downtime), Ordering::Relaxed);
        l.dirty_pages_rate
            .store(s.dirty_pages_rate, Ordering::Relaxed);
        l.bandwidth.store(s.bandwidth, Ordering::Relaxed);
        l.downtime_limit_us
            .store(us(s.downtime_limit), Ordering::Relaxed);
    }

    pub(crate) fn set_remaining_pages(&self, pages: u64) {
        self.live.remaining_pages.store(pages, Ordering::Relaxed);
    }

    pub(crate) fn set_throttle(&self, percent: u8) {
        self.live
            .throttle
            .store(u64::from(percent), Ordering::Relaxed);
    }

    pub(crate) fn set_downtime(&self, d: Duration) {
        self.live.downtime_us.store(us(d), Ordering::Relaxed);
    }
}

/// The figures of one dirty sync.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SyncFigures {
    pub(crate) remaining_pages: u64,
    pub(crate) expected_downtime: Duration,
    pub(crate) dirty_pages_rate: u64,
    /// Bytes per second.
    pub(crate) bandwidth: u64,
    pub(crate) downtime_limit: Duration,
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
