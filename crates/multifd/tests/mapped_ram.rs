//! The file target through the library: save (static and live) -> read
//! and restore; a network migration captured into a file; hostile files.

mod util;

use std::os::unix::fs::MetadataExt;

use multifd::mapped_ram::{self, Capture, FileOptions, FileUri, RestoreOptions};
use multifd::{
    Error, GuestRam, Listener, MigrationConfig, Progress, RamBlock, ReceiveOptions, SourceOptions,
    StaticRam, Uri, ZeroPageDetection,
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

fn restore_into_anon(uri: &FileUri, channels: u8) -> multifd::Result<multifd::Incoming> {
    mapped_ram::restore(
        uri,
        &mut AnonRam,
        &RestoreOptions {
            channels,
            ..RestoreOptions::default()
        },
        &Progress::default(),
    )
}

const BLOCKS: [(&str, u64); 3] = [("m0", 3000), ("pc.bios", 64), ("zero-rom", 1)];

#[test]
fn save_then_restore_at_offsets_and_channel_counts() {
    let dir = tempfile::tempdir().unwrap();
    let ram = source_ram(&BLOCKS, 7);
    for (offset, channels) in [(0u64, 4u8), (4096, 1), ((1 << 20) + 100, 3)] {
        let path = dir.path().join(format!("x-{offset}.mr"));
        if offset > 0 {
            std::fs::write(&path, vec![0xee; offset as usize + 777]).unwrap();
        }
        let uri = FileUri {
            path: path.clone(),
            offset,
        };
        let stats = mapped_ram::save(
            &uri,
            &ram,
            &mut StaticRam,
            &opts(channels),
            &FileOptions::default(),
            &Progress::default(),
        )
        .unwrap();
        assert_eq!(stats.normal_pages + stats.zero_pages, 3065);
        let bytes = std::fs::read(&path).unwrap();
        assert!(
            bytes[..offset as usize].iter().all(|&b| b == 0xee),
            "prefix kept"
        );
        let image = mapped_ram::read_file(&uri, 1 << 20).unwrap();
        assert_eq!(image.configuration.capabilities, ["mapped-ram"]);
        for (i, l) in image.layouts.iter().enumerate() {
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
        assert_eq!(ram_diff(&ram, &inc.ram), None, "offset {offset}");
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
    mapped_ram::save(
        &uri,
        &ram,
        &mut StaticRam,
        &opts(4),
        &FileOptions::default(),
        &Progress::default(),
    )
    .unwrap();
    let md = std::fs::metadata(&uri.path).unwrap();
    assert!(
        md.blocks() * 512 < md.len() - (7 << 20),
        "{} allocated of {}",
        md.blocks() * 512,
        md.len()
    );
    let image = mapped_ram::read_file(&uri, 1 << 20).unwrap();
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
    let image = mapped_ram::read_file(&uri, 1 << 20).unwrap();
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
        mapped_ram::save(
            &uri,
            &ram,
            &mut StaticRam,
            &o,
            &FileOptions::default(),
            &Progress::default(),
        )
        .unwrap();
        let image = mapped_ram::read_file(&uri, 1 << 20).unwrap();
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
    let e = mapped_ram::save(
        &FileUri::new(&path),
        &ram,
        &mut StaticRam,
        &opts(2),
        &FileOptions::default(),
        &Progress::default(),
    )
    .unwrap_err();
    assert!(matches!(e, Error::FileExists { .. }), "{e}");
    assert_eq!(std::fs::read(&path).unwrap(), b"keep");
    let mut o = opts(2);
    o.config.method.compression = multifd::Compression::Zstd;
    let other = dir.path().join("y.mr");
    let e = mapped_ram::save(
        &FileUri::new(&other),
        &ram,
        &mut StaticRam,
        &o,
        &FileOptions::default(),
        &Progress::default(),
    )
    .unwrap_err();
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
        let image = mapped_ram::read_file(&uri, 1 << 20).unwrap();
        assert!(image.layouts.iter().all(|l| l.is_canonical()));
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
    mapped_ram::save(
        &uri,
        &ram,
        &mut StaticRam,
        &opts(2),
        &FileOptions::default(),
        &Progress::default(),
    )
    .unwrap();
    let good = std::fs::read(&uri.path).unwrap();
    let image = mapped_ram::read_file(&uri, 1 << 20).unwrap();
    let h = image.layouts[0].header_offset() as usize;
    let len = good.len();
    let patch = |at: usize, bytes: &[u8]| {
        let mut f = good.clone();
        f[at..at + bytes.len()].copy_from_slice(bytes);
        f
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "truncated in the pages",
            good[..image.layouts[0].pages_offset() as usize + 8192].to_vec(),
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
