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

/// A guest whose RAM is a sparse file it writes itself (another process's
/// shared mapping, here positioned writes): on the first dirty sync it
/// fills pages that were holes when round 1 sent them as zero pages
/// without reading them, and reports them dirty.
struct HoleFiller {
    file: std::fs::File,
    pages: Vec<u64>,
    syncs: usize,
}

impl SourceVm for HoleFiller {
    fn collect_dirty(&mut self, _: &GuestRam, dirty: &mut [Vec<u64>]) -> multifd::Result<()> {
        use std::os::unix::fs::FileExt;
        self.syncs += 1;
        if self.syncs == 1 {
            for &p in &self.pages {
                self.file
                    .write_all_at(&[p as u8 | 0x80; 4096], p * PAGE)
                    .unwrap();
                dirty[0].push(p * PAGE);
            }
        }
        Ok(())
    }

    fn pause(&mut self) -> multifd::Result<()> {
        Ok(())
    }

    fn device_state(&mut self) -> multifd::Result<Vec<u8>> {
        Ok(Vec::new())
    }
}

/// Pages in holes of a file-backed source are zero pages known without a
/// read; a hole the guest fills after that is re-sent from the dirty log,
/// and the destination ends identical, with every zero-page mode. On tmpfs
/// a hole read through a mapping is memory allocated: the source file must
/// not grow.
#[test]
fn holes_of_a_sparse_source_file_are_zero_pages_and_filled_holes_are_resent() {
    use std::os::unix::fs::{FileExt, MetadataExt};
    let shm = std::path::Path::new("/dev/shm");
    for zero in [
        ZeroPageDetection::Multifd,
        ZeroPageDetection::Legacy,
        ZeroPageDetection::None,
    ] {
        let dir = if shm.is_dir() {
            tempfile::tempdir_in(shm).unwrap()
        } else {
            tempfile::tempdir().unwrap()
        };
        let path = dir.path().join("ram");
        let pages = 4096u64;
        let file = std::fs::File::create(&path).unwrap();
        file.set_len(pages * PAGE).unwrap();
        let mut rng = Rng(7);
        // Data in a few extents, each page patterned; the rest holes.
        for p in (0..40).chain(1000..1100).chain(3000..3001) {
            let mut page = [0u8; 4096];
            page[(rng.next() % 4096) as usize] = 1 + (rng.next() % 255) as u8;
            page[0] = p as u8 | 1;
            file.write_all_at(&page, p * PAGE).unwrap();
        }
        // A page of zeros written out: data to the file system, a zero
        // page to the scan.
        file.write_all_at(&[0; 4096], 2000 * PAGE).unwrap();
        file.sync_all().unwrap();
        let allocated = || std::fs::metadata(&path).unwrap().blocks() * 512;
        let before = allocated();
        let mut src = GuestRam::new();
        src.push(RamBlock::open_file("pc.ram", &path, multifd::Access::ReadOnly, None).unwrap())
            .unwrap();
        let config = cfg(3, Compression::None, zero, FlushMode::PerRound);
        let listener = Listener::bind(&tcp()).unwrap();
        let uri = listener.local_uri().unwrap();
        let ropts = ReceiveOptions {
            config: config.clone(),
            accept_timeout: Some(Duration::from_secs(10)),
            ..ReceiveOptions::default()
        };
        let sopts = SourceOptions {
            config,
            downtime_limit: Duration::ZERO,
            max_rounds: 4,
            ..SourceOptions::default()
        };
        let mut guest = HoleFiller {
            file: std::fs::OpenOptions::new().write(true).open(&path).unwrap(),
            pages: vec![50, 51, 2500, 4095],
            syncs: 0,
        };
        let (rp, sp) = (Progress::default(), Progress::default());
        let (sent, received) = std::thread::scope(|s| {
            let r = s.spawn(|| multifd::receive(&listener, &ropts, &mut AnonRam, &rp));
            let sent = multifd::migrate(&uri, &src, &mut guest, &sopts, &sp);
            (sent, r.join().unwrap())
        });
        let (sent, received) = (sent.unwrap(), received.unwrap());
        // Before the comparison below reads every page.
        let after = allocated();
        assert!(
            identical(&src, &received.ram),
            "{zero:?}: destination differs"
        );
        let mut page = [0u8; 4096];
        received.ram.blocks()[0]
            .read_page(2500 * PAGE, &mut page)
            .unwrap();
        assert!(page.iter().all(|&b| b == 2500u64 as u8 | 0x80), "{zero:?}");
        match zero {
            ZeroPageDetection::None => assert_eq!(sent.zero_pages, 0),
            _ => {
                assert!(
                    sent.zero_pages >= pages - 142,
                    "{zero:?}: {}",
                    sent.zero_pages
                );
                // Only the guest's four pages were added.
                assert!(
                    after <= before + 4 * PAGE,
                    "{zero:?}: the source file grew from {before} to {after} bytes"
                );
            }
        }
    }
}
