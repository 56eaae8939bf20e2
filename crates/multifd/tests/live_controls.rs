//! Source controls a live migration needs, with RAM that has no VM behind
//! it: `max_bandwidth` (one token bucket over all channels) and the
//! `query-migrate`-shaped figures of a finished migration.

mod util;

use std::time::Duration;

use multifd::{
    GuestRam, Listener, MigrationConfig, MigrationStatus, Progress, RamBlock, ReceiveOptions,
    SourceOptions, StaticRam,
};
use util::AnonRam;

/// `pages` pages that are neither zero nor alike.
fn data_ram(pages: u64) -> GuestRam {
    let block = RamBlock::anonymous("pc.ram", pages * 4096).unwrap();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut page = [0u8; 4096];
    for p in 0..pages {
        for w in page.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        block.write_page(p * 4096, &page).unwrap();
    }
    let mut ram = GuestRam::new();
    ram.push(block).unwrap();
    ram
}

fn run(ram: &GuestRam, max_bandwidth: Option<u64>) -> (multifd::Stats, Progress) {
    let config = MigrationConfig {
        channels: 4,
        ..MigrationConfig::default()
    };
    let listener = Listener::bind(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
    let uri = listener.local_uri().unwrap();
    let ropts = ReceiveOptions {
        config: config.clone(),
        accept_timeout: Some(Duration::from_secs(10)),
        ..ReceiveOptions::default()
    };
    let sopts = SourceOptions {
        config,
        max_bandwidth,
        ..SourceOptions::default()
    };
    let progress = Progress::default();
    let stats = std::thread::scope(|s| {
        let r = s.spawn(|| multifd::receive(&listener, &ropts, &mut AnonRam, &Progress::default()));
        let sent = multifd::migrate(&uri, ram, &mut StaticRam, &sopts, &progress);
        r.join().unwrap().expect("receiver");
        sent.expect("sender")
    });
    (stats, progress)
}

#[test]
fn max_bandwidth_is_held_within_5_percent() {
    // 96 MiB at 100 MB/s: about 1 s (this also runs unoptimised, where
    // 200 MB/s is more than a loaded 2-core machine may move; the release
    // figure at 200 MB/s is in the README).
    let rate = std::env::var("MULTIFD_TEST_BANDWIDTH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000_000u64);
    let ram = data_ram(96 * 256);
    let (stats, progress) = run(&ram, Some(rate));
    let measured = stats.bytes as f64 / stats.duration_s;
    let err = measured / rate as f64 - 1.0;
    eprintln!(
        "max_bandwidth {rate} B/s: {} bytes in {:.3} s = {measured:.0} B/s ({:+.1}%)",
        stats.bytes,
        stats.duration_s,
        err * 100.0
    );
    assert!(err.abs() <= 0.05, "{measured:.0} B/s for a limit of {rate}");
    let info = progress.query();
    assert_eq!(info.status, MigrationStatus::Completed);
    assert_eq!(info.transferred, stats.bytes);
    assert!(info.mbps > 0.0 && info.mbps < rate as f64 * 8.0 / 1e6 * 1.1);
    assert_eq!(info.remaining, 0);
    assert!(info.downtime.is_some());
}

#[test]
fn unlimited_is_not_slowed_down() {
    let ram = data_ram(16 * 256);
    let (stats, progress) = run(&ram, None);
    let info = progress.query();
    assert_eq!(info.status, MigrationStatus::Completed);
    assert!(info.total_time as f64 <= stats.duration_s * 1e3 + 1.0);
    assert!(info.setup_time <= info.total_time);
    assert_eq!(info.dirty_sync_count, 1, "one sync after round 1");
}
