//! The file target through the library: save (static and live) -> read
//! and restore; a network migration captured into a file; hostile files.

mod util;

use std::os::unix::fs::MetadataExt;

use multifd::mapped_ram::{self, Capture, FileOptions, FileUri, ReadLimits, RestoreOptions};
use multifd::{
    Error, GuestRam, Listener, MigrationConfig, Progress, RamBlock, ReceiveOptions, SourceOptions,
    StaticRam, Stats, Uri, ZeroPageDetection,
};
use multifd_wire::PAGE_SIZE_U64;
use multifd_wire::mapped_ram::PAGES_ALIGNMENT;
use util::{AnonRam, Dirtier, ram_diff, source_ram};

fn opts(channels: u8) -> SourceOptions {
    SourceOptions {
        config: MigrationConfig {
            channels,
            ..MigrationConfig::default()
        },
        ..SourceOptions::default()
    }
}

/// Saves `ram`, a source that does not change, to `uri`.
fn save(uri: &FileUri, ram: &GuestRam, opts: &SourceOptions) -> multifd::Result<Stats> {
    mapped_ram::save(
        uri,
        ram,
        &mut StaticRam,
        opts,
        &FileOptions::default(),
        &Progress::default(),
    )
}

fn ropts(channels: u8, direct_io: bool) -> RestoreOptions {
    RestoreOptions {
        channels,
        file: FileOptions {
            direct_io,
            ..FileOptions::default()
        },
        ..RestoreOptions::default()
    }
}

fn restore_into_anon(uri: &FileUri, channels: u8) -> multifd::Result<multifd::Incoming> {
    mapped_ram::restore(
        uri,
        &mut AnonRam,
        &ropts(channels, false),
        &Progress::default(),
    )
}

/// `r`, or `None` (said on stderr) where direct I/O was asked for and the
/// file system refuses it.
fn unless_no_direct_io<T>(r: multifd::Result<T>, direct_io: bool, what: &str) -> Option<T> {
    match r {
        Err(Error::DirectIoUnsupported { .. }) if direct_io => {
            eprintln!("skipped {what}: the file system refuses O_DIRECT");
            None
        }
        r => Some(r.unwrap()),
    }
}

/// A directory on the project's disk and, where present, one on
/// /dev/shm (tmpfs).
fn disk_and_tmpfs() -> Vec<tempfile::TempDir> {
    let mut places = vec![tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap()];
    if std::path::Path::new("/dev/shm").is_dir() {
        places.push(tempfile::tempdir_in("/dev/shm").unwrap());
    }
    places
}

/// Asserts that the file `path` holds the pages of `ram`'s first block.
fn assert_file_holds(path: &std::path::Path, ram: &GuestRam, what: &str) {
    let bytes = std::fs::read(path).unwrap();
    let block = &ram.blocks()[0];
    assert_eq!(bytes.len() as u64, block.len(), "{what}: length");
    let mut page = [0u8; 4096];
    for p in 0..block.pages() {
        block.read_page(p * PAGE_SIZE_U64, &mut page).unwrap();
        let at = (p * PAGE_SIZE_U64) as usize;
        assert!(bytes[at..at + 4096] == page, "{what}: page {p} of the file");
    }
}

const BLOCKS: [(&str, u64); 3] = [("m0", 3000), ("pc.bios", 64), ("zero-rom", 1)];

#[test]
fn save_then_restore_at_offsets_and_channel_counts() {
    let ram = source_ram(&BLOCKS, 7);
    // On tmpfs the channels copy pages into mappings of the file.
    let places = disk_and_tmpfs();
    let cases = [(0u64, 4u8), (4096, 1), ((1 << 20) + 100, 3)];
    for (dir, (offset, channels)) in places.iter().flat_map(|d| cases.map(|c| (d, c))) {
        let path = dir.path().join(format!("x-{offset}.mr"));
        if offset > 0 {
            std::fs::write(&path, vec![0xee; offset as usize + 777]).unwrap();
        }
        let uri = FileUri {
            path: path.clone(),
            offset,
        };
        let stats = save(&uri, &ram, &opts(channels)).unwrap();
        assert_eq!(stats.normal_pages + stats.zero_pages, 3065);
        let bytes = std::fs::read(&path).unwrap();
        assert!(
            bytes[..offset as usize].iter().all(|&b| b == 0xee),
            "prefix kept"
        );
        let image = mapped_ram::read_file(&uri, &ReadLimits::default()).unwrap();
        assert_eq!(image.configuration.capabilities, ["mapped-ram"]);
        for (i, l) in image.layouts().iter().enumerate() {
            assert!(l.is_canonical());
            assert_eq!(l.pages_offset() % PAGES_ALIGNMENT, 0);
            // Present exactly where the source has data.
            let block = &ram.blocks()[i];
            for p in 0..block.pages() {
                let zero = block.is_zero_page(p * PAGE_SIZE_U64).unwrap();
                assert_eq!(image.bitmap(i).get(p), Some(!zero), "block {i} page {p}");
            }
        }
        assert!(image.switchover_start);
        let inc = restore_into_anon(&uri, channels).unwrap();
        assert_eq!(ram_diff(&ram, &inc.ram), None, "{dir:?} offset {offset}");
        assert_eq!(inc.configuration.capabilities, Vec::<String>::new());
    }
}

/// Non-zero pages of `ram`, per block.
fn data_pages(ram: &GuestRam) -> Vec<u64> {
    ram.blocks()
        .iter()
        .map(|b| {
            (0..b.pages())
                .filter(|p| !b.is_zero_page(p * PAGE_SIZE_U64).unwrap())
                .count() as u64
        })
        .collect()
}

#[test]
fn zero_pages_are_holes() {
    let dir = tempfile::tempdir().unwrap();
    let ram = source_ram(&[("m0", 4096)], 3);
    // A long run of zero pages: its reserved space is given back.
    for p in 1024..3072 {
        ram.blocks()[0]
            .write_page(p * PAGE_SIZE_U64, &[0; 4096])
            .unwrap();
    }
    let uri = FileUri::new(dir.path().join("holes.mr"));
    save(&uri, &ram, &opts(4)).unwrap();
    let md = std::fs::metadata(&uri.path).unwrap();
    assert!(
        md.blocks() * 512 < md.len() - (7 << 20),
        "{} allocated of {}",
        md.blocks() * 512,
        md.len()
    );
    let image = mapped_ram::read_file(&uri, &ReadLimits::default()).unwrap();
    assert_eq!(vec![image.present_pages(0)], data_pages(&ram));
}

#[test]
fn a_live_save_keeps_the_last_copy_of_each_page() {
    let dir = tempfile::tempdir().unwrap();
    let ram = source_ram(&[("m0", 4096), ("m1", 100)], 3);
    let uri = FileUri::new(dir.path().join("live.mr"));
    let mut vm = Dirtier {
        calls: 0,
        seed: 11,
        per_call: 300,
        calls_limit: 4,
    };
    let o = SourceOptions {
        downtime_limit: std::time::Duration::ZERO,
        ..opts(4)
    };
    let stats = mapped_ram::save(
        &uri,
        &ram,
        &mut vm,
        &o,
        &FileOptions::default(),
        &Progress::default(),
    )
    .unwrap();
    assert!(stats.rounds >= 4, "{stats:?}");
    let inc = restore_into_anon(&uri, 2).unwrap();
    assert_eq!(ram_diff(&ram, &inc.ram), None);
    let image = mapped_ram::read_file(&uri, &ReadLimits::default()).unwrap();
    assert_eq!(image.parts, stats.rounds as u32 - 2, "a PART per round");
}

#[test]
fn zero_page_detection_none_and_legacy() {
    let dir = tempfile::tempdir().unwrap();
    let ram = source_ram(&BLOCKS, 5);
    let data: u64 = data_pages(&ram).iter().sum();
    for (zp, present) in [
        (ZeroPageDetection::None, 3065),
        (ZeroPageDetection::Legacy, data),
    ] {
        let uri = FileUri::new(dir.path().join(format!("{}.mr", zp.name())));
        let mut o = opts(2);
        o.config.zero_page_detection = zp;
        save(&uri, &ram, &o).unwrap();
        let image = mapped_ram::read_file(&uri, &ReadLimits::default()).unwrap();
        let n: u64 = (0..3).map(|i| image.present_pages(i)).sum();
        assert_eq!(n, present, "{zp:?}");
        let inc = restore_into_anon(&uri, 3).unwrap();
        assert_eq!(ram_diff(&ram, &inc.ram), None);
    }
}

#[test]
fn an_existing_file_is_not_written_over_and_compression_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ram = source_ram(&BLOCKS, 1);
    let path = dir.path().join("x.mr");
    std::fs::write(&path, b"keep").unwrap();
    let e = save(&FileUri::new(&path), &ram, &opts(2)).unwrap_err();
    assert!(matches!(e, Error::FileExists { .. }), "{e}");
    assert_eq!(std::fs::read(&path).unwrap(), b"keep");
    let mut o = opts(2);
    o.config.method.compression = multifd::Compression::Zstd;
    let other = dir.path().join("y.mr");
    let e = save(&FileUri::new(&other), &ram, &o).unwrap_err();
    assert!(matches!(e, Error::Config(_)), "{e}");
    assert!(!other.exists());
}

#[test]
fn a_network_migration_is_captured_into_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let ram = source_ram(&BLOCKS, 9);
    for (channels, zp, compression) in [
        (4u8, ZeroPageDetection::Multifd, multifd::Compression::None),
        (2, ZeroPageDetection::Legacy, multifd::Compression::Zstd),
    ] {
        let uri = FileUri {
            path: dir.path().join(format!("cap-{channels}.mr")),
            offset: 4096 * u64::from(channels),
        };
        let sock = Uri::Unix(dir.path().join(format!("s{channels}.sock")));
        let listener = Listener::bind(&sock).unwrap();
        let mut config = MigrationConfig {
            channels,
            zero_page_detection: zp,
            ..MigrationConfig::default()
        };
        config.method.compression = compression;
        let ropts = ReceiveOptions {
            config: config.clone(),
            ..ReceiveOptions::default()
        };
        let mut capture = Capture::new(uri.clone());
        // The first capture is of a static source (its bitmap is checked
        // exactly), the second of a source that dirties pages.
        let mut vm = Dirtier {
            calls: 0,
            seed: 2,
            per_call: 100,
            calls_limit: if channels == 4 { 0 } else { 3 },
        };
        let sopts = SourceOptions {
            config,
            downtime_limit: std::time::Duration::ZERO,
            ..SourceOptions::default()
        };
        let incoming = std::thread::scope(|s| {
            let dest =
                s.spawn(|| multifd::receive(&listener, &ropts, &mut capture, &Progress::default()));
            multifd::migrate(&sock, &ram, &mut vm, &sopts, &Progress::default()).unwrap();
            dest.join().unwrap()
        })
        .unwrap();
        capture.finish(&incoming).unwrap();
        drop(incoming);
        let inc = restore_into_anon(&uri, 3).unwrap();
        assert_eq!(ram_diff(&ram, &inc.ram), None, "{channels} channels");
        let image = mapped_ram::read_file(&uri, &ReadLimits::default()).unwrap();
        assert!(image.layouts().iter().all(|l| l.is_canonical()));
        if channels == 4 {
            // Exactly the non-zero pages are present; the rest are holes.
            let present: Vec<u64> = (0..3).map(|i| image.present_pages(i)).collect();
            assert_eq!(present, data_pages(&ram));
        }
    }
}

/// A file made from scratch: a hostile change to it must be a typed
/// error before any page is written, and RAM must stay untouched.
#[test]
fn hostile_files_fail_cleanly_before_touching_ram() {
    let dir = tempfile::tempdir().unwrap();
    let ram = source_ram(&[("m0", 600)], 4);
    let uri = FileUri::new(dir.path().join("good.mr"));
    save(&uri, &ram, &opts(2)).unwrap();
    let good = std::fs::read(&uri.path).unwrap();
    let image = mapped_ram::read_file(&uri, &ReadLimits::default()).unwrap();
    let h = image.layouts()[0].header_offset() as usize;
    let len = good.len();
    let patch = |at: usize, bytes: &[u8]| {
        let mut f = good.clone();
        f[at..at + bytes.len()].copy_from_slice(bytes);
        f
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "truncated in the pages",
            good[..image.layouts()[0].pages_offset() as usize + 8192].to_vec(),
        ),
        ("truncated in the tail", good[..len - 10].to_vec()),
        ("truncated in the header", good[..h + 10].to_vec()),
        ("version 2", patch(h, &2u32.to_be_bytes())),
        ("page size 8192", patch(h + 4, &8192u64.to_be_bytes())),
        ("page size 0", patch(h + 4, &0u64.to_be_bytes())),
        (
            "bitmap past EOF",
            patch(h + 12, &(len as u64 + 4096).to_be_bytes()),
        ),
        (
            "bitmap in the header",
            patch(h + 12, &(h as u64).to_be_bytes()),
        ),
        (
            "pages misaligned",
            patch(h + 20, &0x10_0800u64.to_be_bytes()),
        ),
        (
            "pages past EOF",
            patch(h + 20, &(len as u64).next_multiple_of(4096).to_be_bytes()),
        ),
        ("pages over the bitmap", patch(h + 20, &0u64.to_be_bytes())),
        ("no mapped-ram capability", {
            let at = good.windows(10).position(|w| w == b"mapped-ram").unwrap();
            patch(at, b"mapped-rom")
        }),
    ];
    for (what, bytes) in cases {
        let path = dir.path().join("bad.mr");
        std::fs::write(&path, &bytes).unwrap();
        let block = RamBlock::anonymous("m0", 600 * PAGE_SIZE_U64).unwrap();
        block.write_page(0, &[0x77; 4096]).unwrap();
        let mut dest = GuestRam::new();
        dest.push(block).unwrap();
        struct Given(Option<GuestRam>);
        impl multifd::RamProvider for Given {
            fn provide(&mut self, _: &[multifd::RamBlockInfo]) -> multifd::Result<GuestRam> {
                Ok(self.0.take().unwrap())
            }
        }
        let mut given = Given(Some(dest));
        let e = mapped_ram::restore(
            &FileUri::new(&path),
            &mut given,
            &RestoreOptions::default(),
            &Progress::default(),
        )
        .unwrap_err();
        assert!(
            matches!(
                e,
                Error::BadMappedRamFile { .. } | Error::IncompleteFile { .. }
            ),
            "{what}: {e:?}"
        );
        assert!(
            given.0.is_some(),
            "{what}: RAM was asked for before the file was checked"
        );
    }
    // A block list that does not match the destination's RAM.
    let mut other = GuestRam::new();
    other
        .push(RamBlock::anonymous("m0", 601 * PAGE_SIZE_U64).unwrap())
        .unwrap();
    struct Given(Option<GuestRam>);
    impl multifd::RamProvider for Given {
        fn provide(&mut self, _: &[multifd::RamBlockInfo]) -> multifd::Result<GuestRam> {
            Ok(self.0.take().unwrap())
        }
    }
    let e = mapped_ram::restore(
        &uri,
        &mut Given(Some(other)),
        &RestoreOptions::default(),
        &Progress::default(),
    )
    .unwrap_err();
    assert!(matches!(e, Error::Mismatch(_)), "{e:?}");
}

/// Present pages in runs of 1 to 40 pages between holes of 1 to 40 pages
/// (so holes both shorter and longer than the ones a read steps over,
/// and exactly at the limit), then one run longer than a read and one
/// long hole. Returns the RAM and which pages are present.
fn runs_and_holes_ram(pages: u64) -> (GuestRam, Vec<bool>) {
    let block = RamBlock::anonymous("m0", pages * PAGE_SIZE_U64).unwrap();
    let mut present = vec![false; pages as usize];
    let mut lens = [1u64, 16, 17, 3, 40, 15, 2, 33, 5, 18, 1, 9, 17]
        .iter()
        .cycle();
    let mut p = 0;
    let long_run = (mapped_ram::MAX_READ / PAGE_SIZE_U64) * 2 + 5;
    let tail = long_run + 600;
    while p + 80 < pages - tail {
        let run = *lens.next().unwrap();
        let hole = *lens.next().unwrap();
        for q in p..p + run {
            present[q as usize] = true;
        }
        p += run + hole;
    }
    for q in p..p + long_run {
        present[q as usize] = true;
    }
    // The rest (600 pages and more) stays a hole.
    for (q, &here) in present.iter().enumerate() {
        if here {
            let mut data = [0u8; 4096];
            data[..8].copy_from_slice(&(q as u64 + 1).to_le_bytes());
            data[8..].fill(q as u8 | 0x80);
            block.write_page(q as u64 * PAGE_SIZE_U64, &data).unwrap();
        }
    }
    let mut ram = GuestRam::new();
    ram.push(block).unwrap();
    (ram, present)
}

/// Gives the blocks of files already full of 0x5a bytes: memory that is
/// not known to be zero, so absent pages must be made zero.
struct Stale(std::path::PathBuf);

impl multifd::RamProvider for Stale {
    fn provide(&mut self, blocks: &[multifd::RamBlockInfo]) -> multifd::Result<GuestRam> {
        let mut ram = GuestRam::new();
        for b in blocks {
            let path = self.0.join(format!("{}.ram", b.idstr));
            std::fs::write(&path, vec![0x5a; b.used_length as usize]).unwrap();
            ram.push(RamBlock::open_file(
                &b.idstr,
                &path,
                multifd::Access::ReadWrite,
                Some(b.used_length),
            )?)?;
        }
        Ok(ram)
    }
}

/// Reads step over short holes: the hole's bytes in the file (stale data
/// here, as a file written over several rounds has) never reach guest
/// RAM, every present page lands, and absent pages read as zero, also in
/// a destination whose memory held other bytes; with and without direct
/// I/O, with one and with several threads.
#[test]
fn reads_over_short_holes_never_bring_their_bytes_into_ram() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let pages = 6000;
    let (ram, present) = runs_and_holes_ram(pages);
    let uri = FileUri::new(dir.path().join("holes.mr"));
    save(&uri, &ram, &opts(2)).unwrap();
    let image = mapped_ram::read_file(&uri, &ReadLimits::default()).unwrap();
    let bitmap = image.bitmap(0);
    for (p, &here) in present.iter().enumerate() {
        assert_eq!(bitmap.get(p as u64), Some(here), "page {p}");
    }
    let holes: Vec<u64> = bitmap
        .runs()
        .zip(bitmap.runs().skip(1))
        .map(|(a, b)| b.start - a.end)
        .collect();
    let limit = mapped_ram::MAX_HOLE_READ_OVER;
    assert!(holes.contains(&1) && holes.contains(&limit) && holes.contains(&(limit + 1)));
    // Stale bytes in every absent page of the file.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&uri.path)
        .unwrap();
    let pages_at = image.layouts()[0].pages_offset();
    for (p, &here) in present.iter().enumerate() {
        if !here {
            f.write_all_at(&[0xa5; 4096], pages_at + p as u64 * PAGE_SIZE_U64)
                .unwrap();
        }
    }
    drop(f);
    let n_present = present.iter().filter(|&&p| p).count() as u64;
    for direct_io in [false, true] {
        for channels in [1u8, 3] {
            let ropts = ropts(channels, direct_io);
            let what = format!("direct-io {direct_io}, {channels} channels");
            // Memory known to be zero: absent pages are not touched.
            let restored = mapped_ram::restore(&uri, &mut AnonRam, &ropts, &Progress::default());
            let Some(inc) = unless_no_direct_io(restored, direct_io, &what) else {
                continue;
            };
            assert_eq!(ram_diff(&ram, &inc.ram), None, "{what}");
            assert_eq!(inc.ram.blocks()[0].received_pages(), n_present, "{what}");
            assert_eq!(inc.stats.normal_pages, n_present, "{what}");
            assert_eq!(inc.stats.bytes, n_present * PAGE_SIZE_U64, "{what}");
            drop(inc);
            // Memory full of other bytes: absent pages are made zero.
            let dest = tempfile::tempdir().unwrap();
            let inc = mapped_ram::restore(
                &uri,
                &mut Stale(dest.path().to_owned()),
                &ropts,
                &Progress::default(),
            )
            .unwrap();
            assert_eq!(ram_diff(&ram, &inc.ram), None, "{what}, stale destination");
            assert_eq!(inc.stats.normal_pages, n_present, "{what}");
            assert_eq!(inc.stats.zero_pages, pages - n_present, "{what}");
            drop(inc);
            assert_file_holds(&dest.path().join("m0.ram"), &ram, &what);
        }
    }
}

/// Gives the blocks as new RAM files in a directory (what `--ram` files
/// that do not exist yet are): their pages are written through the files'
/// descriptors, not through the mappings.
struct Fresh(std::path::PathBuf);

impl multifd::RamProvider for Fresh {
    fn provide(&mut self, blocks: &[multifd::RamBlockInfo]) -> multifd::Result<GuestRam> {
        let mut ram = GuestRam::new();
        for b in blocks {
            let path = self.0.join(format!("{}.ram", b.idstr));
            ram.push(RamBlock::create_file(&b.idstr, &path, b.used_length)?)?;
        }
        Ok(ram)
    }
}

/// Gives the blocks of files that held other bytes and were then
/// pre-faulted (zeroed through their mappings, what `receive --prefault`
/// does): known to be zero, and populated, so pages are read into the
/// mappings.
struct Prefaulted(std::path::PathBuf);

impl multifd::RamProvider for Prefaulted {
    fn provide(&mut self, blocks: &[multifd::RamBlockInfo]) -> multifd::Result<GuestRam> {
        let mut ram = GuestRam::new();
        for b in blocks {
            let path = self.0.join(format!("{}.ram", b.idstr));
            std::fs::write(&path, vec![0x5a; b.used_length as usize]).unwrap();
            let mut block = RamBlock::open_file(
                &b.idstr,
                &path,
                multifd::Access::ReadWrite,
                Some(b.used_length),
            )?;
            block.prefault()?;
            ram.push(block)?;
        }
        Ok(ram)
    }
}

/// Restoring into RAM files gives the same bytes as restoring into
/// anonymous memory (read into the mapping), with the saved file on the
/// project's disk and on /dev/shm, with and without direct I/O, into new
/// files (written through their descriptors), files that held other
/// bytes and pre-faulted ones (written through their mappings): the
/// files themselves hold the image, and absent pages are zero in them.
#[test]
fn restores_into_ram_files_match_the_mapped_path_on_disk_and_tmpfs() {
    let pages = 6000;
    let (ram, present) = runs_and_holes_ram(pages);
    let n_present = present.iter().filter(|&&p| p).count() as u64;
    for dir in &disk_and_tmpfs() {
        let uri = FileUri::new(dir.path().join("ram-files.mr"));
        save(&uri, &ram, &opts(3)).unwrap();
        for direct_io in [false, true] {
            let ropts = ropts(2, direct_io);
            let what = format!("{}, direct-io {direct_io}", dir.path().display());
            let restored = mapped_ram::restore(&uri, &mut AnonRam, &ropts, &Progress::default());
            let Some(mapped) = unless_no_direct_io(restored, direct_io, &what) else {
                continue;
            };
            assert_eq!(ram_diff(&ram, &mapped.ram), None, "{what}, mapped");
            for kind in ["fresh", "stale", "prefaulted"] {
                let dest = tempfile::tempdir_in(dir.path()).unwrap();
                let at = dest.path().to_owned();
                let mut provider: Box<dyn multifd::RamProvider> = match kind {
                    "fresh" => Box::new(Fresh(at)),
                    "stale" => Box::new(Stale(at)),
                    _ => Box::new(Prefaulted(at)),
                };
                let inc = mapped_ram::restore(&uri, &mut *provider, &ropts, &Progress::default())
                    .unwrap();
                let what = format!("{what}, {kind}");
                assert_eq!(ram_diff(&mapped.ram, &inc.ram), None, "{what}");
                // Absent pages made zero count as received.
                let received = if kind == "stale" { pages } else { n_present };
                assert_eq!(inc.ram.blocks()[0].received_pages(), received, "{what}");
                assert_eq!(inc.stats.normal_pages, n_present, "{what}");
                assert_eq!(inc.stats.bytes, n_present * PAGE_SIZE_U64, "{what}");
                drop(inc);
                assert_file_holds(&dest.path().join("m0.ram"), &ram, &what);
            }
        }
    }
}

/// A source whose RAM is a file is read through the file's descriptor:
/// the saved file is byte for byte the one saved from the same bytes in
/// anonymous memory, with zero pages that are holes of the source file,
/// zero pages written as data, without zero-page detection, and with
/// direct I/O.
#[test]
fn saving_from_a_ram_file_matches_saving_from_memory() {
    use std::os::unix::fs::FileExt;
    let pages = 6000;
    let (ram, present) = runs_and_holes_ram(pages);
    for dir in &disk_and_tmpfs() {
        // The source file: present pages written, absent ones holes except
        // every seventh, written as zeros.
        let path = dir.path().join("source.ram");
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(pages * PAGE_SIZE_U64).unwrap();
        let mut page = [0u8; 4096];
        for (p, &here) in present.iter().enumerate() {
            let at = p as u64 * PAGE_SIZE_U64;
            if here {
                ram.blocks()[0].read_page(at, &mut page).unwrap();
                f.write_all_at(&page, at).unwrap();
            } else if p % 7 == 0 {
                f.write_all_at(&[0u8; 4096], at).unwrap();
            }
        }
        drop(f);
        let mut from_file = GuestRam::new();
        from_file
            .push(
                RamBlock::open_file("m0", &path, multifd::Access::ReadOnly, Some(pages * 4096))
                    .unwrap(),
            )
            .unwrap();
        // Direct I/O writes from the buffer the file's pages are read
        // into, and a write goes on over short runs of zero pages.
        'saves: for (zp, direct_io) in [
            (ZeroPageDetection::Multifd, false),
            (ZeroPageDetection::None, false),
            (ZeroPageDetection::Multifd, true),
        ] {
            let mut o = opts(3);
            o.config.zero_page_detection = zp;
            let file_opts = FileOptions {
                direct_io,
                ..FileOptions::default()
            };
            let mut saved = Vec::new();
            for (from, source) in [("memory", &ram), ("file", &from_file)] {
                let name = format!("{from}-{}-{direct_io}.mr", zp.name());
                let uri = FileUri::new(dir.path().join(name));
                let what = format!(
                    "{}, {from}, {zp:?}, direct-io {direct_io}",
                    dir.path().display()
                );
                let r = mapped_ram::save(
                    &uri,
                    source,
                    &mut StaticRam,
                    &o,
                    &file_opts,
                    &Progress::default(),
                );
                // Where the file system takes direct I/O from memory, it
                // takes it from the buffer too: an unaligned buffer fails.
                if saved.is_empty() {
                    if unless_no_direct_io(r, direct_io, &what).is_none() {
                        continue 'saves;
                    }
                } else {
                    r.unwrap();
                }
                let inc = restore_into_anon(&uri, 2).unwrap();
                assert_eq!(ram_diff(&ram, &inc.ram), None, "{what}");
                let image = mapped_ram::read_file(&uri, &ReadLimits::default()).unwrap();
                let n_present = present.iter().filter(|&&p| p).count() as u64;
                let expected = match zp {
                    ZeroPageDetection::None => pages,
                    _ => n_present,
                };
                assert_eq!(image.present_pages(0), expected, "{what}");
                saved.push(std::fs::read(&uri.path).unwrap());
            }
            assert!(
                saved[0] == saved[1],
                "{}, {zp:?}, direct-io {direct_io}: files differ",
                dir.path().display()
            );
        }
    }
}

/// A restore into new `--ram` files on tmpfs, whose pages are written
/// through the files' descriptors, does not reserve the files: they hold
/// the image, and only its present pages take memory.
#[test]
fn restored_ram_files_on_tmpfs_hold_only_present_pages() {
    if !std::path::Path::new("/dev/shm").is_dir() {
        eprintln!("skipped: no /dev/shm");
        return;
    }
    let pages = 6000;
    let (ram, present) = runs_and_holes_ram(pages);
    let n_present = present.iter().filter(|&&p| p).count() as u64;
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let uri = FileUri::new(dir.path().join("tmpfs.mr"));
    save(&uri, &ram, &opts(2)).unwrap();
    let target = dir.path().join("m0.ram");
    let named = [("m0".to_owned(), target.clone())].into_iter().collect();
    let mut provider = multifd::snapshot::FileRamProvider::new(named, None, false)
        .unwrap()
        .written_through_files();
    let inc =
        mapped_ram::restore(&uri, &mut provider, &ropts(3, false), &Progress::default()).unwrap();
    // Before anything reads the mapping (a read fault on tmpfs allocates).
    let allocated = std::fs::metadata(&target).unwrap().blocks() * 512;
    assert_eq!(allocated, n_present * PAGE_SIZE_U64, "bytes allocated");
    assert_eq!(ram_diff(&ram, &inc.ram), None);
    drop(inc);
    assert_file_holds(&target, &ram, "tmpfs");
}
