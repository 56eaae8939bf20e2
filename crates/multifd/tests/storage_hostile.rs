//! Hostile input against the receiver's storage: block names that used to
//! share a snapshot file, links and files planted in a snapshot directory,
//! hostile manifests, a source announcing terabytes it never sends, a zstd
//! frame asking for a huge window, and a file system that fills up under
//! guest RAM.
//!
//! Migrations run over real loopback sockets (TCP and Unix), files are
//! real files (the full-file-system case mounts a small tmpfs). Every
//! failure must be a typed error within a few seconds, with no engine
//! thread or file descriptor left behind (the tests of this binary are
//! serialised so those counts mean something), nothing written through a
//! planted link, and nothing left mounted.

mod util;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use multifd::mapped_ram;
use multifd::snapshot::{self, FileRamProvider, Manifest};
use multifd::{
    Cancel, Compression, Endpoint, Error, GuestRam, Incoming, Progress, RamBlock, RamBlockInfo,
    RamProvider, ReceiveOptions, SourceOptions, StaticRam, Stats, StreamPlan,
};
use multifd_wire::stream::Configuration;
use util::*;

/// Bound for a migration that should succeed.
const SLOW: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------
// Helpers

/// Receive options of these tests: `channels` channels, short timeouts.
fn opts(channels: u8) -> ReceiveOptions {
    recv_opts(channels, Duration::from_secs(2))
}

/// Runs a real source (`migrate` of `src` with `plan`) against a receiver
/// with `provider`, both bounded: the receiver must return within `limit`
/// and so must the source (it is cancelled otherwise, and that is a
/// failure). Returns both results.
fn migrate_into(
    t: Transport,
    src: &GuestRam,
    plan: StreamPlan,
    ropts: ReceiveOptions,
    provider: Box<dyn RamProvider + Send>,
    limit: Duration,
) -> (multifd::Result<Incoming>, multifd::Result<Stats>) {
    let Bound { listener, uri, dir } = bind(t);
    let sopts = SourceOptions {
        config: ropts.config.clone(),
        plan,
        cancel: Some(Arc::new(Cancel::new())),
        ..SourceOptions::default()
    };
    let receiving = start_receiver(listener, ropts, provider);
    let (tx, rx) = mpsc::channel();
    let sent = std::thread::scope(|s| {
        std::thread::Builder::new()
            .name("hp-send".into())
            .spawn_scoped(s, || {
                let r = multifd::migrate(&uri, src, &mut StaticRam, &sopts, &Progress::default());
                let _ = tx.send(r);
            })
            .unwrap();
        match rx.recv_timeout(limit) {
            Ok(r) => r,
            Err(_) => {
                sopts.cancel.as_ref().unwrap().cancel();
                let late = rx.recv_timeout(FAST);
                panic!("{t:?}: the source did not return within {limit:?} ({late:?})");
            }
        }
    });
    let Some((received, took)) = receiving.wait(limit) else {
        panic!("{t:?}: the receiver did not return within {limit:?}");
    };
    receiving.handle.join().unwrap();
    drop(dir);
    if let Err(e) = &received {
        assert!(
            took < FAST,
            "{t:?}: the receiver failed after {took:?}: {e}"
        );
    }
    (received, sent)
}

/// A receiver that must fail: returns its error (the source must end too,
/// within the bound).
fn receive_fails(t: Transport, src: &GuestRam, provider: Box<dyn RamProvider + Send>) -> Error {
    receive_fails_with(t, src, provider, Compression::None)
}

/// [`receive_fails`] with a payload method.
fn receive_fails_with(
    t: Transport,
    src: &GuestRam,
    provider: Box<dyn RamProvider + Send>,
    compression: Compression,
) -> Error {
    let mut ro = opts(2);
    ro.config.method.compression = compression;
    // The source may or may not notice: with no return path, a source
    // whose bytes all fit the socket buffers ends well.
    let (received, _sent) = migrate_into(t, src, StreamPlan::default(), ro, provider, FAST);
    received
        .err()
        .unwrap_or_else(|| panic!("{t:?}: the receiver succeeded"))
}

fn snapshot_provider(dir: &Path) -> Box<FileRamProvider> {
    Box::new(FileRamProvider::new(BTreeMap::new(), Some(dir.to_owned()), false).unwrap())
}

fn no_files() -> BTreeMap<String, PathBuf> {
    BTreeMap::new()
}

fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// A snapshot in `dir` made without a migration: blocks `blocks` (name,
/// pages) received through the provider and written with a pattern, then
/// stored.
fn handmade_snapshot(dir: &Path, blocks: &[(&str, u64)]) -> Manifest {
    let mut provider = FileRamProvider::new(BTreeMap::new(), Some(dir.to_owned()), false).unwrap();
    let infos: Vec<RamBlockInfo> = blocks
        .iter()
        .map(|&(n, pages)| RamBlockInfo {
            idstr: n.into(),
            used_length: pages * 4096,
        })
        .collect();
    let ram = provider.provide(&infos).unwrap();
    for b in ram.blocks() {
        for p in 0..b.pages() {
            b.write_page(p * 4096, &[p as u8 | 1; 4096]).unwrap();
        }
    }
    let incoming = Incoming {
        ram,
        configuration: Configuration {
            machine: "none".into(),
            ..Configuration::default()
        },
        prefix: b"prefix".to_vec(),
        tail: b"tail".to_vec(),
        ram_section_id: 1,
        switchover_start: true,
        flushes: 0,
        stats: Stats {
            bytes: 0,
            normal_pages: 0,
            zero_pages: 0,
            rounds: 0,
            duration_s: 0.0,
            throughput_mib_s: 0.0,
        },
    };
    snapshot::store(dir, &incoming).unwrap()
}

fn write_manifest(dir: &Path, v: &serde_json::Value) {
    std::fs::write(dir.join("manifest.json"), serde_json::to_vec(v).unwrap()).unwrap();
}

/// `snapshot::open` on a thread, bounded: a hostile snapshot must not make
/// it hang (a FIFO, a huge file).
fn open_bounded(
    dir: &Path,
    files: BTreeMap<String, PathBuf>,
) -> multifd::Result<(GuestRam, StreamPlan, Manifest)> {
    let dir = dir.to_owned();
    let (tx, rx) = mpsc::channel();
    let h = spawn("open", move || {
        let _ = tx.send(snapshot::open(&dir, &files));
    });
    let r = rx.recv_timeout(FAST).expect("snapshot::open hangs");
    h.join().unwrap();
    r
}

fn bad_snapshot(r: multifd::Result<(GuestRam, StreamPlan, Manifest)>, want: &str, what: &str) {
    match r {
        Err(Error::BadSnapshot { path, reason }) => assert!(
            reason.contains(want),
            "{what}: reason {reason:?} ({}) does not say {want:?}",
            path.display()
        ),
        Err(e) => panic!("{what}: expected BadSnapshot ({want}), got {e:?}"),
        Ok(_) => panic!("{what}: a hostile snapshot opened"),
    }
}

// ---------------------------------------------------------------------------
// 1. Block names are untrusted bytes

/// Ids that mapped to one file name before (`a/b`, `a_b`, `a b`; names
/// differing only outside ASCII), the longest id the wire allows, and a
/// QEMU-like one: each gets a file of its own and replays intact.
#[test]
fn block_names_that_used_to_collide_get_files_of_their_own() {
    let _g = serial();
    let long = format!("{}y", "x/".repeat(127));
    assert_eq!(long.len(), 255);
    let names = [
        "a/b",
        "a_b",
        "a b",
        "a\u{e9}b",
        "a\u{e8}b",
        long.as_str(),
        "/rom@etc/acpi/tables",
    ];
    let blocks: Vec<(&str, u64)> = names.iter().map(|&n| (n, 16)).collect();
    let src = source_ram(&blocks, 5);
    for t in TRANSPORTS {
        let base = Baseline::take();
        let tmp = tempdir();
        let dir = tmp.path().join("snap");
        let (received, sent) = migrate_into(
            t,
            &src,
            StreamPlan::default(),
            opts(2),
            snapshot_provider(&dir),
            SLOW,
        );
        sent.unwrap_or_else(|e| panic!("{t:?}: source: {e}"));
        let incoming = received.unwrap_or_else(|e| panic!("{t:?}: receiver: {e}"));
        assert_eq!(ram_diff(&src, &incoming.ram), None, "{t:?}: as received");
        let m = snapshot::store(&dir, &incoming).unwrap();
        drop(incoming);

        let files: BTreeSet<&Path> = m.ram_blocks.iter().map(|b| b.file.as_path()).collect();
        assert_eq!(files.len(), names.len(), "{t:?}: shared files: {files:?}");
        assert_eq!(
            m.ram_blocks[6].file,
            Path::new("ram/0006-rom_etc_acpi_tables.ram")
        );
        for b in &m.ram_blocks {
            assert!(!b.external, "{t:?}: {b:?}");
            let name = b.file.file_name().unwrap();
            assert!(name.len() < 255, "{t:?}: {} bytes", name.len());
            assert_eq!(allocated(&dir.join(&b.file)) % 4096, 0);
        }

        // Replay the snapshot into a second receiver: every block intact.
        let (ram, plan, _) = open_bounded(&dir, no_files()).unwrap();
        assert_eq!(ram_diff(&src, &ram), None, "{t:?}: as stored");
        let (received, sent) = migrate_into(t, &ram, plan, opts(3), Box::new(AnonRam), SLOW);
        sent.unwrap_or_else(|e| panic!("{t:?}: replaying source: {e}"));
        let replayed = received.unwrap_or_else(|e| panic!("{t:?}: replay receiver: {e}"));
        assert_eq!(ram_diff(&src, &replayed.ram), None, "{t:?}: as replayed");
        drop((ram, replayed));
        base.check(&format!("{t:?}: colliding names"));
    }
}

/// Before listening: a snapshot directory that already holds a block
/// file, a manifest, or a `ram` link is refused, and nothing behind a
/// planted link is touched.
#[test]
fn a_snapshot_dir_holding_files_or_links_is_refused_up_front() {
    let _g = serial();
    let tmp = tempdir();
    let victim = tmp.path().join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    let victim_dir = tmp.path().join("victim-dir");
    std::fs::create_dir(&victim_dir).unwrap();

    let refused = |dir: &Path, want: &Path| match FileRamProvider::new(
        BTreeMap::new(),
        Some(dir.to_owned()),
        false,
    ) {
        Err(Error::FileExists { path }) => assert_eq!(path, want),
        other => panic!("{}: expected FileExists, got {other:?}", dir.display()),
    };
    // A link where the first block's file will be.
    let d1 = tmp.path().join("d1");
    std::fs::create_dir_all(d1.join("ram")).unwrap();
    std::os::unix::fs::symlink(&victim, d1.join("ram/0000-m0.ram")).unwrap();
    refused(&d1, &d1.join("ram/0000-m0.ram"));
    // `ram` itself a link to another directory.
    let d2 = tmp.path().join("d2");
    std::fs::create_dir(&d2).unwrap();
    std::os::unix::fs::symlink(&victim_dir, d2.join("ram")).unwrap();
    refused(&d2, &d2.join("ram"));
    // A finished snapshot.
    for f in ["manifest.json", "prefix.bin", "tail.bin"] {
        let d = tmp.path().join(format!("d-{f}"));
        std::fs::create_dir(&d).unwrap();
        std::os::unix::fs::symlink(&victim, d.join(f)).unwrap();
        refused(&d, &d.join(f));
    }
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    assert_eq!(std::fs::read_dir(&victim_dir).unwrap().count(), 0);
}

/// Links planted after the receiver looked (a race with whoever else can
/// write the directory): the block file is created exclusively, so the
/// receiver fails with `FileExists`, and nothing is written through the
/// link; `store` likewise for the prefix, tail and manifest.
#[test]
fn links_planted_during_a_receive_are_never_followed() {
    let _g = serial();
    let src = source_ram(&[("m0", 32), ("m1", 16)], 9);
    for t in TRANSPORTS {
        let base = Baseline::take();
        let tmp = tempdir();
        let victim = tmp.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let victim_dir = tmp.path().join("victim-dir");
        std::fs::create_dir(&victim_dir).unwrap();

        // The second block's file is a link when its turn comes.
        let dir = tmp.path().join("snap");
        let provider = snapshot_provider(&dir);
        std::fs::create_dir_all(dir.join("ram")).unwrap();
        let planted = dir.join("ram/0001-m1.ram");
        std::os::unix::fs::symlink(&victim, &planted).unwrap();
        let e = receive_fails(t, &src, provider);
        assert!(
            matches!(&e, Error::FileExists { path } if *path == planted),
            "{t:?}: {e:?}"
        );
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious", "{t:?}");
        assert!(planted.symlink_metadata().unwrap().is_symlink());
        // The first block's file, created before the failure, is gone again.
        assert!(!dir.join("ram/0000-m0.ram").exists(), "{t:?}");

        // `ram` is a link to another directory when the blocks come.
        let dir = tmp.path().join("snap2");
        let provider = snapshot_provider(&dir);
        std::fs::create_dir(&dir).unwrap();
        std::os::unix::fs::symlink(&victim_dir, dir.join("ram")).unwrap();
        let e = receive_fails(t, &src, provider);
        assert!(
            matches!(&e, Error::FileExists { path } if *path == dir.join("ram")),
            "{t:?}: {e:?}"
        );
        assert_eq!(std::fs::read_dir(&victim_dir).unwrap().count(), 0, "{t:?}");

        // Links planted between the receive and `store`.
        for f in ["prefix.bin", "tail.bin", "manifest.json"] {
            let dir = tmp.path().join(format!("snap-{f}"));
            let (received, sent) = migrate_into(
                t,
                &src,
                StreamPlan::default(),
                opts(1),
                snapshot_provider(&dir),
                SLOW,
            );
            sent.unwrap();
            let incoming = received.unwrap();
            std::os::unix::fs::symlink(&victim, dir.join(f)).unwrap();
            let e = snapshot::store(&dir, &incoming).unwrap_err();
            assert!(
                matches!(&e, Error::FileExists { path } if *path == dir.join(f)),
                "{t:?} {f}: {e:?}"
            );
            assert_eq!(std::fs::read(&victim).unwrap(), b"precious", "{t:?} {f}");
            if f != "manifest.json" {
                assert!(!dir.join("manifest.json").exists(), "{t:?} {f}");
            }
        }
        base.check(&format!("{t:?}: planted links"));
    }
}

/// Every way a manifest or the files it names can point somewhere else,
/// be something else, or be too big: a typed error, promptly, without
/// opening what it points at.
#[test]
fn hostile_manifests_are_bad_snapshots() {
    let _g = serial();
    let tmp = tempdir();
    let outside = tmp.path().join("outside.ram");
    std::fs::write(&outside, vec![0x66u8; 8 * 4096]).unwrap();
    let mut n = 0;
    let mut fresh = || {
        n += 1;
        let dir = tmp.path().join(format!("s{n}"));
        let m = handmade_snapshot(&dir, &[("m0", 8), ("m1", 4)]);
        let v = serde_json::to_value(&m).unwrap();
        (dir, v)
    };

    // The template opens.
    let (dir, _) = fresh();
    let (ram, plan, m) = open_bounded(&dir, no_files()).unwrap();
    assert_eq!(ram.blocks().len(), 2);
    assert_eq!(plan.tail.as_deref(), Some(&b"tail"[..]));
    assert_eq!(m.ram_blocks[0].file, Path::new("ram/0000-m0.ram"));
    drop(ram);

    // Paths in the manifest.
    for (file, want) in [
        ("../outside.ram", "`..`"),
        ("ram/../../outside.ram", "`..`"),
        ("./ram/0000-m0.ram", "`.`"),
        ("ram//0000-m0.ram", "empty path segment"),
        ("", "empty path"),
        ("ram", "not a regular file"),
        ("ram/missing.ram", "missing"),
    ] {
        let (dir, mut v) = fresh();
        v["ram_blocks"][0]["file"] = file.into();
        write_manifest(&dir, &v);
        bad_snapshot(open_bounded(&dir, no_files()), want, file);
    }
    for (key, value, want) in [
        ("prefix", "/etc/hostname", "absolute"),
        ("tail", "../outside.ram", "`..`"),
        ("tail", "ram", "not a regular file"),
    ] {
        let (dir, mut v) = fresh();
        v[key] = value.into();
        write_manifest(&dir, &v);
        bad_snapshot(
            open_bounded(&dir, no_files()),
            want,
            &format!("{key} {value}"),
        );
    }
    // An absolute path is an external block: never opened unasked.
    let (dir, mut v) = fresh();
    v["ram_blocks"][0]["file"] = outside.display().to_string().into();
    write_manifest(&dir, &v);
    match open_bounded(&dir, no_files()) {
        Err(Error::ExternalBlock { block, recorded }) => {
            assert_eq!(block, "m0");
            assert_eq!(recorded, outside);
        }
        other => panic!("absolute block path: {:?}", other.map(|_| ())),
    }

    // Links inside the directory that lead out of it.
    let (dir, _) = fresh();
    std::fs::remove_file(dir.join("ram/0000-m0.ram")).unwrap();
    std::os::unix::fs::symlink(&outside, dir.join("ram/0000-m0.ram")).unwrap();
    bad_snapshot(open_bounded(&dir, no_files()), "outside", "block file link");
    let (dir, _) = fresh();
    std::fs::remove_file(dir.join("tail.bin")).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", dir.join("tail.bin")).unwrap();
    bad_snapshot(open_bounded(&dir, no_files()), "outside", "tail link");
    let (dir, _) = fresh();
    let moved = tmp.path().join("moved-ram");
    std::fs::rename(dir.join("ram"), &moved).unwrap();
    std::os::unix::fs::symlink(&moved, dir.join("ram")).unwrap();
    bad_snapshot(open_bounded(&dir, no_files()), "outside", "ram dir link");
    // A link that stays inside is fine.
    let (dir, mut v) = fresh();
    std::os::unix::fs::symlink("0000-m0.ram", dir.join("ram/alias.ram")).unwrap();
    v["ram_blocks"][0]["file"] = "ram/alias.ram".into();
    write_manifest(&dir, &v);
    open_bounded(&dir, no_files()).unwrap();

    // Not a regular file: a FIFO would block a plain open forever.
    let (dir, mut v) = fresh();
    let fifo = dir.join("ram/fifo.ram");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    v["ram_blocks"][0]["file"] = "ram/fifo.ram".into();
    write_manifest(&dir, &v);
    bad_snapshot(
        open_bounded(&dir, no_files()),
        "not a regular file",
        "FIFO block",
    );
    let (dir, _) = fresh();
    std::fs::remove_file(dir.join("prefix.bin")).unwrap();
    assert!(
        Command::new("mkfifo")
            .arg(dir.join("prefix.bin"))
            .status()
            .unwrap()
            .success()
    );
    bad_snapshot(
        open_bounded(&dir, no_files()),
        "not a regular file",
        "FIFO prefix",
    );

    // The manifest itself.
    let (dir, _) = fresh();
    let real = tmp.path().join("real-manifest.json");
    std::fs::rename(dir.join("manifest.json"), &real).unwrap();
    std::os::unix::fs::symlink(&real, dir.join("manifest.json")).unwrap();
    bad_snapshot(
        open_bounded(&dir, no_files()),
        "symbolic link",
        "manifest link",
    );
    let (dir, _) = fresh();
    std::fs::File::create(dir.join("manifest.json"))
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    bad_snapshot(open_bounded(&dir, no_files()), "limit", "1 GiB manifest");
    let (dir, _) = fresh();
    std::fs::File::options()
        .write(true)
        .open(dir.join("tail.bin"))
        .unwrap()
        .set_len(4 << 30)
        .unwrap();
    bad_snapshot(open_bounded(&dir, no_files()), "limit", "4 GiB tail");
    for (bytes, want) in [
        (&b"{not json"[..], "key must be a string"),
        (&b""[..], "EOF"),
        (&b"{\"format\": 1}"[..], "missing field"),
    ] {
        let (dir, _) = fresh();
        std::fs::write(dir.join("manifest.json"), bytes).unwrap();
        bad_snapshot(open_bounded(&dir, no_files()), want, "garbage manifest");
    }

    // Values.
    let edits: [(&str, serde_json::Value, &str); 8] = [
        ("format", 2.into(), "format 2"),
        ("ram_blocks/0/page_size", 8192.into(), "page size"),
        ("ram_blocks/0/length", 0.into(), "multiple of 4096"),
        ("ram_blocks/0/length", 4095.into(), "multiple of 4096"),
        ("ram_blocks/0/length", (16 * 4096).into(), "manifest says"),
        ("ram_blocks/0/idstr", "".into(), "1 to 255 bytes"),
        (
            "ram_blocks/0/idstr",
            "x".repeat(256).into(),
            "1 to 255 bytes",
        ),
        ("ram_blocks/1/idstr", "m0".into(), "listed twice"),
    ];
    for (at, value, want) in edits {
        let (dir, mut v) = fresh();
        *v.pointer_mut(&format!("/{at}")).unwrap() = value;
        write_manifest(&dir, &v);
        bad_snapshot(open_bounded(&dir, no_files()), want, at);
    }
}

/// A block received into a `--ram` file outside the snapshot directory is
/// recorded as external; replay maps it only from a file its caller names.
#[test]
fn external_blocks_replay_only_from_a_file_the_caller_names() {
    let _g = serial();
    let src = source_ram(&[("m0", 64), ("pc.bios", 16)], 3);
    for t in TRANSPORTS {
        let base = Baseline::take();
        let tmp = tempdir();
        let dir = tmp.path().join("snap");
        let m0 = tmp.path().join("guest-m0.ram");
        let provider = FileRamProvider::new(
            [("m0".to_owned(), m0.clone())].into_iter().collect(),
            Some(dir.clone()),
            false,
        )
        .unwrap();
        let (received, sent) = migrate_into(
            t,
            &src,
            StreamPlan::default(),
            opts(2),
            Box::new(provider),
            SLOW,
        );
        sent.unwrap();
        let incoming = received.unwrap();
        let m = snapshot::store(&dir, &incoming).unwrap();
        drop(incoming);
        assert!(m.ram_blocks[0].external && m.ram_blocks[0].is_external());
        assert_eq!(m.ram_blocks[0].file, m0.canonicalize().unwrap());
        assert!(!m.ram_blocks[1].external);
        assert_eq!(m.ram_blocks[1].file, Path::new("ram/0001-pc.bios.ram"));
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
        assert_eq!(json["ram_blocks"][0]["external"], true);
        assert!(json["ram_blocks"][1].get("external").is_none());

        match open_bounded(&dir, no_files()) {
            Err(Error::ExternalBlock { block, recorded }) => {
                assert_eq!(block, "m0");
                assert_eq!(recorded, m0.canonicalize().unwrap());
            }
            other => panic!("{t:?}: {:?}", other.map(|_| ())),
        }
        let named = |name: &str, path: &Path| -> BTreeMap<String, PathBuf> {
            [(name.to_owned(), path.to_owned())].into_iter().collect()
        };
        assert!(matches!(
            open_bounded(&dir, named("nope", &m0)),
            Err(Error::Mismatch(_))
        ));
        let short = tmp.path().join("short.ram");
        std::fs::write(&short, vec![0u8; 4096]).unwrap();
        assert!(matches!(
            open_bounded(&dir, named("m0", &short)),
            Err(Error::Config(_))
        ));

        let (ram, plan, _) = open_bounded(&dir, named("m0", &m0)).unwrap();
        assert_eq!(ram_diff(&src, &ram), None, "{t:?}");
        let (received, sent) = migrate_into(t, &ram, plan, opts(2), Box::new(AnonRam), SLOW);
        sent.unwrap();
        assert_eq!(
            ram_diff(&src, &received.unwrap().ram),
            None,
            "{t:?}: replayed"
        );
        drop(ram);
        base.check(&format!("{t:?}: external block"));
    }
}

// ---------------------------------------------------------------------------
// 2. Bounded memory

fn status_kib(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"))
}

/// Resets this process's VmHWM to its current RSS (Linux 4.0+).
fn reset_peak_rss() {
    std::fs::write("/proc/self/clear_refs", "5").expect("resetting VmHWM");
}

/// A source announces 1024 blocks of 4 GiB (4 TiB; the receiver's RAM
/// limit raised to allow it) and sends one page into each, every one in
/// another 128 MiB of its block. The receiver's peak RSS may exceed what
/// it had before by the pages written plus at most 64 MiB.
#[test]
fn terabytes_announced_cost_nothing_until_pages_arrive() {
    let _g = serial();
    const BLOCKS: usize = 1024;
    const BLOCK_LEN: u64 = 4 << 30;
    let names: Vec<String> = (0..BLOCKS).map(|i| format!("huge{i:04}")).collect();
    let blocks: Vec<(&str, u64)> = names.iter().map(|n| (n.as_str(), BLOCK_LEN)).collect();
    for t in TRANSPORTS {
        let base = Baseline::take();
        let mut main = main_setup(&blocks);
        main.extend(main_part());
        main.extend(main_end());
        let mut ch0 = sync_packet(0);
        let mut offsets = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let off = (i as u64 % 32) * (128 << 20) + (i as u64 % 7) * 4096;
            // One data page and one zero page.
            ch0.extend(nocomp_packet(
                name,
                &[off, off + 4096],
                1,
                0x5a,
                i as u64 + 1,
            ));
            offsets.push(off);
        }
        ch0.extend(sync_packet(BLOCKS as u64 + 1));
        ch0.extend(sync_packet(BLOCKS as u64 + 2));
        let written_kib = BLOCKS as u64 * 4;
        let mut ro = opts(1);
        ro.max_ram = u64::MAX;

        let Bound { listener, uri, dir } = bind(t);
        reset_peak_rss();
        let rss_before = status_kib("VmRSS:");
        let receiving = start_receiver(listener, ro, Box::new(AnonRam));
        let peer = scripted_peer(
            uri,
            vec![
                Conn::new(main, vec![], End::Close),
                Conn::new(init_packet([0; 16], 0), ch0, End::Close),
            ],
        );
        let (res, took) = receiving.wait(SLOW).expect("receiver hangs");
        let peak = status_kib("VmHWM:");
        peer.join().unwrap();
        receiving.handle.join().unwrap();
        drop(dir);
        let incoming = res.unwrap_or_else(|e| panic!("{t:?}: {e}"));
        assert_eq!(incoming.ram.total_len(), BLOCKS as u64 * BLOCK_LEN);
        let mut page = [0u8; 4096];
        for (b, &off) in incoming.ram.blocks().iter().zip(&offsets) {
            assert_eq!(b.received_pages(), 2, "{t:?}: {}", b.name());
            b.read_page(off, &mut page).unwrap();
            assert!(page.iter().all(|&x| x == 0x5a));
        }
        let beyond_kib = peak.saturating_sub(rss_before + written_kib);
        eprintln!(
            "{t:?}: 1024 blocks, 4 TiB announced, {} KiB written in {took:?}: RSS before {} KiB, \
             peak {} KiB, beyond what was written {:.1} MiB",
            written_kib,
            rss_before,
            peak,
            beyond_kib as f64 / 1024.0
        );
        assert!(
            beyond_kib <= 64 << 10,
            "{t:?}: the receiver used {:.1} MiB beyond the {written_kib} KiB written",
            beyond_kib as f64 / 1024.0
        );
        drop(incoming);
        base.check(&format!("{t:?}: terabytes announced"));
    }
}

/// zstd frames of one page with window `2^window_log`, flushed.
fn zstd_payload(window_log: u32, page: &[u8; 4096]) -> Vec<u8> {
    use zstd::stream::raw::{CParameter, Encoder, InBuffer, Operation, OutBuffer};
    let mut enc = Encoder::new(1).unwrap();
    enc.set_parameter(CParameter::WindowLog(window_log))
        .unwrap();
    let mut out = vec![0u8; 1 << 20];
    let mut o = OutBuffer::around(&mut out[..]);
    let mut i = InBuffer::around(&page[..]);
    while i.pos() < page.len() {
        enc.run(&mut i, &mut o).unwrap();
    }
    while enc.flush(&mut o).unwrap() != 0 {}
    let n = o.pos();
    out.truncate(n);
    out
}

/// A zstd channel whose frame header asks for a 128 MiB window (what zstd
/// itself would allow) is corrupt; 32 MiB (QEMU's level 20) is fine.
#[test]
fn a_zstd_frame_asking_for_a_huge_window_is_corrupt() {
    let _g = serial();
    let page = [0x3cu8; 4096];
    for t in TRANSPORTS {
        for (window_log, fine) in [(25, true), (27, false)] {
            let base = Baseline::take();
            let mut ro = opts(1);
            ro.config.method.compression = Compression::Zstd;
            let payload = zstd_payload(window_log, &page);
            let mut ch0 = sync_packet(0);
            ch0.extend(ram_header(
                Compression::Zstd,
                "m0",
                &[4096],
                1,
                payload.len() as u32,
                1,
            ));
            ch0.extend(&payload);
            ch0.extend(sync_packet(2));
            ch0.extend(sync_packet(3));
            let mut main = main_setup(&[("m0", 16 * 4096)]);
            main.extend(main_part());
            main.extend(main_end());
            let Bound { listener, uri, dir } = bind(t);
            let receiving = start_receiver(listener, ro, Box::new(AnonRam));
            let peer = scripted_peer(
                uri,
                vec![
                    Conn::new(main, vec![], End::Close),
                    Conn::new(init_packet([0; 16], 0), ch0, End::Close),
                ],
            );
            let (res, took) = receiving.wait(FAST).expect("receiver hangs");
            peer.join().unwrap();
            receiving.handle.join().unwrap();
            drop(dir);
            let what = format!("{t:?}: window 2^{window_log}");
            match res {
                Ok(inc) if fine => {
                    let mut got = [0u8; 4096];
                    inc.ram.blocks()[0].read_page(4096, &mut got).unwrap();
                    assert_eq!(got, page, "{what}");
                }
                Err(Error::Corrupt {
                    endpoint: Endpoint::Channel(0),
                    method: "zstd",
                    reason,
                }) if !fine => {
                    assert!(took < FAST, "{what}: {took:?}");
                    assert!(reason.contains("memory"), "{what}: {reason}");
                }
                other => panic!("{what}: {:?}", other.map(|_| ())),
            }
            base.check(&what);
        }
    }
}

// ---------------------------------------------------------------------------
// 3. A full file system

/// A tmpfs of `size` mounted on a fresh directory, unmounted on drop (lazily
/// if it is busy), so nothing stays mounted even when a test fails.
struct Tmpfs {
    dir: Option<tempfile::TempDir>,
}

impl Tmpfs {
    /// `None` (and a note on stderr) when this process may not mount.
    fn mount(size: &str) -> Option<Self> {
        let dir = tempdir();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir.path())
            .output();
        match out {
            Ok(o) if o.status.success() => Some(Self { dir: Some(dir) }),
            Ok(o) => {
                eprintln!(
                    "skipped: mounting a tmpfs needs root or CAP_SYS_ADMIN: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                None
            }
            Err(e) => {
                eprintln!("skipped: no mount command: {e}");
                None
            }
        }
    }

    fn path(&self) -> &Path {
        self.dir.as_ref().unwrap().path()
    }
}

fn is_mounted(path: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let p = path.to_str().unwrap();
    mounts.lines().any(|l| l.split(' ').nth(1) == Some(p))
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let Some(dir) = self.dir.take() else { return };
        let path = dir.path().to_owned();
        let ok = Command::new("umount")
            .arg(&path)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&path).status();
        }
        drop(dir);
    }
}

/// Set in the child process that runs [`full_file_system_in_a_mount_namespace`].
const CHILD_ENV: &str = "MULTIFD_TEST_FULL_FS_CHILD";

/// Guest RAM that does not fit the file system under the snapshot
/// directory or a `--ram` file: the receiver fails with `NoSpace` naming
/// the file, instead of dying of SIGBUS when a page lands in a hole.
///
/// The case runs in a child process with a mount namespace of its own
/// (`unshare --mount`): its tmpfs is unmounted by a drop guard, and should
/// the child die anyway (of the very SIGBUS this is about), the kernel
/// drops the mount with the namespace. Nothing stays mounted either way.
#[test]
fn a_full_file_system_is_no_space_not_sigbus() {
    use std::io::Read;
    use std::os::unix::process::ExitStatusExt;
    let _g = serial();
    let exe = std::env::current_exe().unwrap();
    let spawned = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "--"])
        .arg(&exe)
        .args([
            "--exact",
            "full_file_system_in_a_mount_namespace",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            eprintln!("skipped: cannot run unshare: {e}");
            return;
        }
    };
    let drain = |mut r: Box<dyn Read + Send>| {
        spawn("pipe", move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the full-file-system case did not end within 120 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = stdout.join().unwrap();
    let err = stderr.join().unwrap();
    eprint!("{err}");
    assert_ne!(
        status.signal(),
        Some(libc::SIGBUS),
        "the receiver died of SIGBUS on a full file system\n{out}"
    );
    if !status.success() && err.starts_with("unshare:") {
        eprintln!("skipped: no mount namespace for this process");
        return;
    }
    assert!(
        status.success(),
        "the full-file-system case failed: {status}\n{out}"
    );
    if err.contains("skipped:") {
        return;
    }
    assert!(out.contains("1 passed"), "the case did not run:\n{out}");
}

/// The body of [`a_full_file_system_is_no_space_not_sigbus`]; does nothing
/// unless run by it. RAM that fits is received, and the space of its zero
/// pages given back.
#[test]
#[ignore = "run by a_full_file_system_is_no_space_not_sigbus, in a mount namespace"]
fn full_file_system_in_a_mount_namespace() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let _g = serial();
    let Some(fs) = Tmpfs::mount("8M") else { return };
    let mount_point = fs.path().to_owned();
    let too_big = source_ram(&[("m0", 4096)], 1); // 16 MiB
    let second_too_big = source_ram(&[("m0", 1024), ("m1", 1536)], 2); // 4 + 6 MiB
    let fits = source_ram(&[("m0", 1024)], 3); // 4 MiB, every third page zero
    for t in TRANSPORTS {
        let base = Baseline::take();
        let dir = mount_point.join(format!("snap-{t:?}"));
        // `none` has the kernel write guest pages (a hole that cannot be
        // filled is EFAULT there); zstd writes them from user space (SIGBUS).
        for compression in [Compression::None, Compression::Zstd] {
            let e = receive_fails_with(t, &too_big, snapshot_provider(&dir), compression);
            match &e {
                Error::NoSpace { path, needed, .. } => {
                    assert_eq!(*path, dir.join("ram/0000-m0.ram"), "{t:?}");
                    assert_eq!(*needed, 16 << 20, "{t:?}");
                }
                other => panic!("{t:?} {compression:?}: expected NoSpace, got {other:?}"),
            }
            assert!(
                message(&e).contains("No space left"),
                "{t:?}: {}",
                message(&e)
            );
            assert_eq!(
                std::fs::read_dir(dir.join("ram")).unwrap().count(),
                0,
                "{t:?}"
            );
            std::fs::remove_dir_all(&dir).unwrap();
        }

        // The first block fits, the second does not: the first is removed.
        let e = receive_fails(t, &second_too_big, snapshot_provider(&dir));
        assert!(
            matches!(&e, Error::NoSpace { path, .. } if *path == dir.join("ram/0001-m1.ram")),
            "{t:?}: {e:?}"
        );
        assert_eq!(
            std::fs::read_dir(dir.join("ram")).unwrap().count(),
            0,
            "{t:?}"
        );

        // A `--ram` file created on the full file system.
        let named = mount_point.join(format!("guest-{t:?}.ram"));
        let provider = FileRamProvider::new(
            [("m0".to_owned(), named.clone())].into_iter().collect(),
            None,
            false,
        )
        .unwrap();
        let e = receive_fails(t, &too_big, Box::new(provider));
        assert!(
            matches!(&e, Error::NoSpace { path, .. } if *path == named),
            "{t:?}: {e:?}"
        );
        assert!(!named.exists(), "{t:?}: the new file is removed again");

        // RAM that fits: received, stored, zero pages given back.
        std::fs::remove_dir_all(&dir).unwrap();
        let (received, sent) = migrate_into(
            t,
            &fits,
            StreamPlan::default(),
            opts(2),
            snapshot_provider(&dir),
            SLOW,
        );
        sent.unwrap();
        let incoming = received.unwrap_or_else(|e| panic!("{t:?}: {e}"));
        let file = dir.join("ram/0000-m0.ram");
        let reserved = allocated(&file);
        snapshot::store(&dir, &incoming).unwrap();
        let kept = allocated(&file);
        assert_eq!(ram_diff(&fits, &incoming.ram), None, "{t:?}");
        drop(incoming);
        let data_pages = (0..1024).filter(|&p| pattern_page(p, 3).is_some()).count() as u64;
        assert_eq!(reserved, 1024 * 4096, "{t:?}: reserved whole");
        assert_eq!(kept, data_pages * 4096, "{t:?}: zero pages given back");
        std::fs::remove_dir_all(&dir).unwrap();
        base.check(&format!("{t:?}: full file system"));
    }

    // An existing sparse `--ram` file that cannot be filled: refused
    // before anything listens, its contents kept.
    let sparse = mount_point.join("sparse.ram");
    let f = std::fs::File::create(&sparse).unwrap();
    f.set_len(16 << 20).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"old", 8192).unwrap();
    drop(f);
    let e = FileRamProvider::new(
        [("m0".to_owned(), sparse.clone())].into_iter().collect(),
        None,
        false,
    )
    .unwrap_err();
    assert!(
        matches!(&e, Error::NoSpace { path, needed, .. } if *path == sparse && *needed == 16 << 20),
        "{e:?}"
    );
    let bytes = std::fs::read(&sparse).unwrap();
    assert_eq!(bytes.len(), 16 << 20);
    assert_eq!(&bytes[8192..8195], b"old");
    drop(bytes);
    std::fs::remove_file(&sparse).unwrap();

    // A mapped-ram save into the full file system. On tmpfs the channels
    // copy pages into mappings of the file, each run's pages allocated
    // first: a full tmpfs is NoSpace, never a SIGBUS, whether the pages
    // come from anonymous RAM or through a RAM file's staging buffer, and
    // the file is removed again.
    let image = tempfile::NamedTempFile::new().unwrap();
    let mut page = [0u8; 4096];
    for p in 0..too_big.blocks()[0].pages() {
        too_big.blocks()[0].read_page(p * 4096, &mut page).unwrap();
        std::os::unix::fs::FileExt::write_all_at(image.as_file(), &page, p * 4096).unwrap();
    }
    let mut from_file = GuestRam::new();
    from_file
        .push(RamBlock::open_file("m0", image.path(), multifd::Access::ReadOnly, None).unwrap())
        .unwrap();
    for (what, ram) in [("anonymous RAM", &too_big), ("a RAM file", &from_file)] {
        let base = Baseline::take();
        let uri = mapped_ram::FileUri::new(mount_point.join("save.mr"));
        let e = mapped_ram::save(
            &uri,
            ram,
            &mut StaticRam,
            &SourceOptions::default(),
            &mapped_ram::FileOptions::default(),
            &Progress::default(),
        )
        .unwrap_err();
        assert!(
            matches!(&e, Error::NoSpace { path, .. } if *path == uri.path),
            "{what}: {e:?}"
        );
        assert!(!uri.path.exists(), "{what}: the file is removed again");
        base.check(&format!("mapped-ram save from {what}: full file system"));
    }

    drop(fs);
    assert!(
        !is_mounted(&mount_point),
        "{} is still mounted",
        mount_point.display()
    );
}

// ---------------------------------------------------------------------------
// Measurement (not part of the default run)

/// What reserving space costs a snapshot, and what punching the holes back
/// gives: a 1 GiB image (40% zero pages, scattered like `multifd
/// gen-image` makes them, or in 8 MiB runs) received into a snapshot on
/// tmpfs and on the file system of the temporary directory, three times
/// each.
/// `cargo test -p multifd --release --test storage_hostile -- --ignored --nocapture`
#[test]
#[ignore = "a measurement: run by hand"]
fn measure_space_reservation() {
    let _g = serial();
    const PAGES: u64 = 1 << 18;
    for (layout, zero) in [
        (
            "scattered",
            &(|p: u64| (p.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40) % 10 < 4)
                as &dyn Fn(u64) -> bool,
        ),
        ("runs", &|p: u64| (p / 512) % 10 < 4),
    ] {
        let mut src = GuestRam::new();
        let b = RamBlock::anonymous("m0", PAGES * 4096).unwrap();
        let mut data_pages = 0;
        for p in 0..PAGES {
            if !zero(p) {
                let mut page = pattern_page(p | 1 << 40, 1).unwrap_or([0x11; 4096]);
                page[0] = 1;
                b.write_page(p * 4096, &page).unwrap();
                data_pages += 1;
            }
        }
        src.push(b).unwrap();
        for base in [Path::new("/dev/shm").to_owned(), std::env::temp_dir()]
            .into_iter()
            .flat_map(|b| [b.clone(), b.clone(), b])
        {
            let tmp = tempfile::tempdir_in(&base).unwrap();
            let dir = tmp.path().join("snap");
            let t0 = Instant::now();
            let provider = snapshot_provider(&dir);
            let (received, sent) = migrate_into(
                Transport::Unix,
                &src,
                StreamPlan::default(),
                opts(4),
                provider,
                Duration::from_secs(120),
            );
            sent.unwrap();
            let incoming = received.unwrap();
            let took = t0.elapsed();
            let file = dir.join("ram/0000-m0.ram");
            let reserved = allocated(&file);
            let t1 = Instant::now();
            let punched = incoming.ram.blocks()[0].release_unwritten().unwrap();
            let punch_took = t1.elapsed();
            let kept = allocated(&file);
            eprintln!(
                "{layout:9} {:12} receive {:6.0} ms; allocated {:5} MiB reserved, {:5} MiB after punching \
                 {:5} MiB in {:5.1} ms; data pages {:5} MiB",
                base.display().to_string(),
                took.as_secs_f64() * 1e3,
                reserved >> 20,
                kept >> 20,
                punched >> 20,
                punch_took.as_secs_f64() * 1e3,
                (data_pages * 4096) >> 20
            );
            let t2 = Instant::now();
            let scratch = dir.join("scratch.ram");
            let r = RamBlock::create_file("x", &scratch, PAGES * 4096).unwrap();
            let create_took = t2.elapsed();
            drop(r);
            eprintln!(
                "{layout:9} {:12} creating and reserving a 1 GiB file: {:.1} ms",
                base.display().to_string(),
                create_took.as_secs_f64() * 1e3
            );
        }
    }
}
