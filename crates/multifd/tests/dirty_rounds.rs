//! Live migration with a guest that keeps writing: several dirty rounds,
//! pages re-sent (often on another channel), pages turning zero and back.
//! The destination must end byte-identical to the source, for every method
//! and zero-page mode.

mod util;

use std::time::Duration;

use multifd::ReceiveOptions;
use multifd::{Compression, FlushMode, MethodConfig, MigrationConfig, Progress, ZeroPageDetection};
use multifd::{GuestRam, RamBlock};
use multifd::{Listener, Uri};
use multifd::{SourceOptions, SourceVm};
use util::AnonRam;

const PAGE: u64 = 4096;

/// SplitMix64.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// A guest that rewrites `per_round` random pages of every block before
/// each dirty-log sync, for `busy_rounds` syncs, then stays quiet.
struct BusyGuest {
    rng: Rng,
    per_round: usize,
    busy_rounds: usize,
    syncs: usize,
    paused: bool,
}

impl BusyGuest {
    fn write_page(&mut self, block: &RamBlock, off: u64) {
        let mut page = [0u8; 4096];
        match self.rng.next() % 4 {
            0 => {} // becomes (or stays) zero
            _ => {
                let seed = self.rng.next();
                for (i, b) in page.iter_mut().enumerate() {
                    *b = (seed >> (i % 57)) as u8 ^ i as u8;
                }
            }
        }
        block.write_page(off, &page).unwrap();
    }
}

impl SourceVm for BusyGuest {
    fn collect_dirty(&mut self, ram: &GuestRam, dirty: &mut [Vec<u64>]) -> multifd::Result<()> {
        self.syncs += 1;
        if self.paused || self.syncs > self.busy_rounds {
            return Ok(());
        }
        for (b, block) in ram.blocks().iter().enumerate() {
            for _ in 0..self.per_round {
                let off = (self.rng.next() % block.pages()) * PAGE;
                self.write_page(block, off);
                dirty[b].push(off);
            }
            dirty[b].sort_unstable();
            dirty[b].dedup();
        }
        Ok(())
    }

    fn pause(&mut self) -> multifd::Result<()> {
        self.paused = true;
        Ok(())
    }

    fn device_state(&mut self) -> multifd::Result<Vec<u8>> {
        Ok(Vec::new())
    }
}

fn source_ram(seed: u64) -> GuestRam {
    let mut ram = GuestRam::new();
    let mut rng = Rng(seed);
    for (name, pages) in [("pc.ram", 2048u64), ("pc.bios", 64)] {
        let block = RamBlock::anonymous(name, pages * PAGE).unwrap();
        for p in 0..pages {
            if !rng.next().is_multiple_of(3) {
                let mut page = [0u8; 4096];
                page[(rng.next() % 4096) as usize] = 1 + (rng.next() % 255) as u8;
                page[0] = p as u8;
                block.write_page(p * PAGE, &page).unwrap();
            }
        }
        ram.push(block).unwrap();
    }
    ram
}

fn identical(a: &GuestRam, b: &GuestRam) -> bool {
    a.blocks().iter().zip(b.blocks()).all(|(x, y)| {
        (0..x.pages()).all(|p| {
            let (mut u, mut v) = ([0u8; 4096], [0u8; 4096]);
            x.read_page(p * PAGE, &mut u).unwrap();
            y.read_page(p * PAGE, &mut v).unwrap();
            u == v
        })
    })
}

fn live_migration(config: MigrationConfig, uri: Uri) {
    let src = source_ram(config.channels.into());
    let listener = Listener::bind(&uri).unwrap();
    let uri = listener.local_uri().unwrap();
    let ropts = ReceiveOptions {
        config: config.clone(),
        accept_timeout: Some(Duration::from_secs(10)),
        ..ReceiveOptions::default()
    };
    let sopts = SourceOptions {
        config: config.clone(),
        // Never "converged" by time: iterate until the guest goes quiet.
        downtime_limit: Duration::ZERO,
        max_rounds: 12,
        ..SourceOptions::default()
    };
    let mut guest = BusyGuest {
        rng: Rng(99),
        per_round: 300,
        busy_rounds: 6,
        syncs: 0,
        paused: false,
    };
    let (rp, sp) = (Progress::default(), Progress::default());
    let (sent, received) = std::thread::scope(|s| {
        let r = s.spawn(|| multifd::receive(&listener, &ropts, &mut AnonRam, &rp));
        let sent = multifd::migrate(&uri, &src, &mut guest, &sopts, &sp);
        (sent, r.join().unwrap())
    });
    let sent = sent.unwrap();
    let received = received.unwrap();
    assert!(
        identical(&src, &received.ram),
        "{config:?}: destination differs"
    );
    // setup + round 1 + 6 busy rounds + final
    assert!(sent.rounds >= 8, "rounds: {}", sent.rounds);
    assert_eq!(
        received.stats.rounds, sent.rounds,
        "one barrier per sync point"
    );
    let total: u64 = src.blocks().iter().map(RamBlock::pages).sum();
    assert!(
        sent.normal_pages + sent.zero_pages > total,
        "pages were re-sent: {} of {total}",
        sent.normal_pages + sent.zero_pages
    );
}

fn cfg(
    channels: u8,
    compression: Compression,
    zero: ZeroPageDetection,
    flush: FlushMode,
) -> MigrationConfig {
    MigrationConfig {
        channels,
        method: MethodConfig {
            compression,
            ..MethodConfig::default()
        },
        zero_page_detection: zero,
        flush_mode: flush,
        ..MigrationConfig::default()
    }
}

fn tcp() -> Uri {
    "tcp:127.0.0.1:0".parse().unwrap()
}

#[test]
fn dirty_rounds_nocomp_multifd_zero_pages() {
    for ch in [1, 3, 8] {
        live_migration(
            cfg(
                ch,
                Compression::None,
                ZeroPageDetection::Multifd,
                FlushMode::PerRound,
            ),
            tcp(),
        );
    }
}

#[test]
fn dirty_rounds_legacy_zero_pages_and_per_section_flush() {
    live_migration(
        cfg(
            4,
            Compression::None,
            ZeroPageDetection::Legacy,
            FlushMode::PerRound,
        ),
        tcp(),
    );
    live_migration(
        cfg(
            4,
            Compression::None,
            ZeroPageDetection::None,
            FlushMode::PerSection,
        ),
        tcp(),
    );
    live_migration(
        cfg(
            2,
            Compression::None,
            ZeroPageDetection::Legacy,
            FlushMode::PerSection,
        ),
        tcp(),
    );
}

#[test]
fn dirty_rounds_compressed() {
    live_migration(
        cfg(
            4,
            Compression::Zlib,
            ZeroPageDetection::Multifd,
            FlushMode::PerRound,
        ),
        tcp(),
    );
    live_migration(
        cfg(
            3,
            Compression::Zstd,
            ZeroPageDetection::Legacy,
            FlushMode::PerRound,
        ),
        tcp(),
    );
}

#[test]
fn dirty_rounds_over_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let uri = Uri::Unix(dir.path().join("mig.sock"));
    live_migration(
        cfg(
            16,
            Compression::None,
            ZeroPageDetection::Multifd,
            FlushMode::PerRound,
        ),
        uri,
    );
}
