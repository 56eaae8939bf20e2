//! A running guest through store-and-forward:
//! QEMU source (guest running) -> `multifd receive --snapshot` ->
//! `multifd send --snapshot` -> fresh QEMU destination -> `cont`.
//!
//! The guest is `guest/loop.asm` (assembled with nasm at test time): it
//! keeps incrementing byte 0 of every page of 16..48 MiB and writes a
//! marker to the serial port after each pass. The checker
//! (`common::checker`) proves the snapshot and the destination's RAM are
//! consistent images of that loop; markers on the destination's serial port
//! prove the guest runs on after the migration.
//!
//! ```text
//! cargo test -p multifd-cli --test live_guest
//! cargo test -p multifd-cli --test live_guest -- --ignored store_and_forward_20x --nocapture
//! MULTIFD_TEST_ACCEL=tcg cargo test -p multifd-cli --test live_guest
//! ```
//! Without qemu-system-x86_64 or nasm every test prints a loud
//! `SKIPPED: ...` line, or fails when the environment variable `CI` is set
//! (as `.ci/run` does).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::checker::{CounterState, check_counters, check_counters_in_file};
use common::qemu::{MigEnd, Qemu, QemuConfig};
use common::{MIB, PAGE, Params, TestCtx, accel, compare_files, file_len, poll, qemu_binary};
use serde_json::json;

/// The range the guest increments (passed to nasm, checked here).
const START: u64 = 16 * MIB;
const END: u64 = 48 * MIB;
/// Guest RAM.
const MEM_MIB: u64 = 128;
/// The page a KVM destination rewrites on load (kvmclock's pvclock area).
const KVM_REWRITTEN_PAGE: u64 = 0xe8000;
/// Time budget of one store-and-forward run.
const BUDGET: Duration = Duration::from_secs(120);
/// Markers to wait for on each side.
const MARKERS: u64 = 3;

/// Whether QEMU and nasm are installed: if not, a loud SKIPPED, or a
/// failure when `CI` is set.
fn tools_available() -> bool {
    let test = std::thread::current()
        .name()
        .unwrap_or("live_guest")
        .to_owned();
    common::require(&test, &[&qemu_binary(), "nasm"])
}

/// Assembles guest/loop.asm into a 1 MiB raw disk image.
fn assemble(ctx: &TestCtx) -> PathBuf {
    let src = common::repo_root().join("guest/loop.asm");
    let out = ctx.path("boot.img");
    let mut cmd = Command::new("nasm");
    cmd.args([
        "-f",
        "bin",
        &format!("-DSTART={START:#x}"),
        &format!("-DEND={END:#x}"),
        "-o",
    ])
    .arg(&out)
    .arg(&src);
    let mut nasm = ctx.spawn("nasm", cmd);
    let st = nasm.wait_timeout(Duration::from_secs(20));
    assert!(
        st.is_some_and(|s| s.success()),
        "nasm failed: {st:?}\n{}",
        nasm.output_tail()
    );
    assert_eq!(file_len(&out), 512, "the boot sector must be 512 bytes");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&out)
        .expect("boot.img");
    f.set_len(MIB).expect("padding boot.img");
    out
}

/// The guest's command line (q35, 128 MiB in `ram`, the boot disk, serial
/// port 0 into `serial`), started paused.
fn guest(name: &str, ram: &Path, boot: &Path, serial: &Path) -> QemuConfig {
    let mut c = QemuConfig::new(name, "q35", MEM_MIB, ram);
    c.extra = vec![
        "-drive".into(),
        format!("file={},format=raw,if=ide,file.locking=off", boot.display()),
        "-serial".into(),
        format!("file:{}", serial.display()),
    ];
    c
}

fn wait_markers(q: &mut Qemu, serial: &Path, n: u64, timeout: Duration) -> u64 {
    let got = poll(timeout, Duration::from_millis(20), || {
        let len = file_len(serial);
        (len >= n).then_some(len)
    });
    match got {
        Some(len) => len,
        None => panic!(
            "{}: {} of {n} serial markers after {timeout:?}\n{}",
            q.config.name,
            file_len(serial),
            q.log()
        ),
    }
}

/// Pages to leave out of byte comparisons of a booted guest.
fn volatile_pages() -> Vec<u64> {
    if accel() == "kvm" {
        vec![KVM_REWRITTEN_PAGE]
    } else {
        Vec::new()
    }
}

struct RunReport {
    snapshot: CounterState,
    destination: CounterState,
    src_markers: u64,
    dst_markers: u64,
    elapsed: Duration,
}

/// One store-and-forward of the running guest; panics on any failure.
fn store_and_forward(name: &str, capture: Params, replay: Params) -> RunReport {
    let t0 = Instant::now();
    let ctx = TestCtx::new(name, BUDGET);
    let boot = assemble(&ctx);

    // 1. The source boots the loop.
    let src_ram = ctx.path("src.ram");
    let src_serial = ctx.path("src.serial");
    let mut src = Qemu::start(&ctx, guest("qemu-src", &src_ram, &boot, &src_serial));
    src.set_multifd(&capture);
    src.cmd("cont", json!({}));
    // SeaBIOS takes seconds before the boot sector runs (more under TCG).
    wait_markers(&mut src, &src_serial, MARKERS, Duration::from_secs(60));

    // 2. QEMU source -> our receiver, stored as a snapshot.
    let snap = ctx.path("snap");
    let snap_m0 = ctx.path("snap-m0.ram");
    let mut args = vec![
        "--ram".to_owned(),
        format!("m0={}", snap_m0.display()),
        "--snapshot".into(),
        snap.display().to_string(),
        "--accept-timeout".into(),
        "30".into(),
        "--quiet".into(),
    ];
    args.extend(capture.cli_args());
    let (mut recv, port) = common::start_receiver(&ctx, "receive", &args);
    src.migrate(port);
    // Under TCG the loop dirties its 32 MiB hundreds of times a second: with
    // compression (and an unoptimised test build of the receiver) a round
    // may never fit QEMU's default 300 ms downtime. Iterate for a while,
    // then allow a long switchover so the migration converges.
    let mut end = src.wait_migration(Duration::from_secs(10));
    if matches!(end, MigEnd::TimedOut(_)) {
        eprintln!("[{name}] source not done after 10 s ({end:?}); raising downtime-limit");
        let _ = src.try_cmd("migrate-set-parameters", json!({"downtime-limit": 60_000}));
        end = src.wait_migration(ctx.remaining());
    }
    assert_eq!(
        end,
        MigEnd::Completed,
        "[{name}] QEMU source\n{}\n{}",
        src.log(),
        recv.output_tail()
    );
    let (st, killed) = recv.wait_or_kill(Duration::from_secs(30));
    assert!(
        st.success() && !killed,
        "[{name}] receiver {st} (killed: {killed})\n{}",
        recv.output_tail()
    );
    let src_markers = file_len(&src_serial);
    let snapshot = check_counters_in_file(&snap_m0, START, END)
        .unwrap_or_else(|e| panic!("[{name}] snapshot: {e}"));
    drop(src);

    // 3. The snapshot -> a fresh destination with the same command line.
    let dst_ram = ctx.path("dst.ram");
    let dst_serial = ctx.path("dst.serial");
    let mut dst_cfg = guest("qemu-dst", &dst_ram, &boot, &dst_serial);
    dst_cfg.incoming = true;
    let mut dst = Qemu::start(&ctx, dst_cfg);
    dst.set_multifd(&replay);
    let port = dst.migrate_incoming();
    let mut args = vec![
        "send".to_owned(),
        "--to".into(),
        format!("tcp:127.0.0.1:{port}"),
        "--snapshot".into(),
        snap.display().to_string(),
        // m0 was received outside the snapshot directory.
        "--ram".into(),
        format!("m0={}", snap_m0.display()),
        "--quiet".into(),
    ];
    args.extend(replay.cli_args());
    let mut send = ctx.multifd("send", &args);
    let (st, killed) = send.wait_or_kill(Duration::from_secs(60));
    assert!(
        st.success() && !killed,
        "[{name}] sender {st} (killed: {killed})\n{}\n{}",
        send.output_tail(),
        dst.log()
    );
    dst.expect_completed(Duration::from_secs(30));
    compare_files(&snap_m0, &dst_ram, &volatile_pages())
        .unwrap_or_else(|e| panic!("[{name}] before cont: {e}"));

    // 4. The destination runs on: new markers, still a consistent loop.
    dst.cmd("cont", json!({}));
    let dst_markers = wait_markers(&mut dst, &dst_serial, MARKERS, Duration::from_secs(30));
    dst.cmd("stop", json!({}));
    let destination = check_counters_in_file(&dst_ram, START, END)
        .unwrap_or_else(|e| panic!("[{name}] destination: {e}"));
    let elapsed = t0.elapsed();
    eprintln!(
        "[{name}] ok in {:.2} s: {src_markers} source passes, snapshot {snapshot:?}, {dst_markers}+ destination passes, destination {destination:?}",
        elapsed.as_secs_f64()
    );
    RunReport {
        snapshot,
        destination,
        src_markers,
        dst_markers,
        elapsed,
    }
}

#[test]
fn live_guest_store_and_forward() {
    if !tools_available() {
        return;
    }
    let r = store_and_forward(
        "live_guest_store_and_forward",
        Params::new(4, "none", "multifd"),
        Params::new(2, "zstd", "multifd"),
    );
    assert!(r.src_markers >= MARKERS && r.dst_markers >= MARKERS);
    assert_ne!(
        r.snapshot.progress(),
        r.destination.progress(),
        "the destination's counters did not move although it printed markers"
    );
}

/// Parameter pairs (capture, replay) the 20x loop cycles through.
const VARIANTS: [(Params, Params); 4] = [
    (
        Params::new(4, "none", "multifd"),
        Params::new(4, "none", "multifd"),
    ),
    (
        Params::new(2, "zstd", "legacy"),
        Params::new(8, "none", "none"),
    ),
    (
        Params::new(8, "zlib", "multifd"),
        Params::new(1, "zstd", "legacy"),
    ),
    (
        Params::new(1, "none", "none"),
        Params::new(16, "zlib", "multifd"),
    ),
];

#[test]
#[ignore = "slow: 20 store-and-forward runs of a live guest"]
fn store_and_forward_20x() {
    if !tools_available() {
        return;
    }
    let t0 = Instant::now();
    let mut passed = 0;
    let mut failures = Vec::new();
    let mut times = Vec::new();
    for i in 0..20 {
        let (capture, replay) = VARIANTS[i % VARIANTS.len()];
        let name = format!("live-{i:02}-{}-to-{}", capture.label(), replay.label());
        match std::panic::catch_unwind(|| store_and_forward(&name, capture, replay)) {
            Ok(r) => {
                passed += 1;
                times.push(r.elapsed.as_secs_f64());
            }
            Err(_) => failures.push(name),
        }
    }
    times.sort_by(f64::total_cmp);
    eprintln!(
        "store_and_forward_20x: {passed}/20 passed with accel {} in {:.1} s (per run: min {:.1} s, median {:.1} s, max {:.1} s)",
        accel(),
        t0.elapsed().as_secs_f64(),
        times.first().copied().unwrap_or(0.0),
        times.get(times.len() / 2).copied().unwrap_or(0.0),
        times.last().copied().unwrap_or(0.0),
    );
    assert!(failures.is_empty(), "failed runs: {failures:?}");
}

// ---------------------------------------------------------------------------
// The checker itself.

fn image(counters: &[u8]) -> Vec<u8> {
    let mut v = vec![0u8; counters.len() * PAGE as usize];
    for (i, &c) in counters.iter().enumerate() {
        v[i * PAGE as usize] = c;
    }
    v
}

#[test]
fn checker_accepts_consistent_images() {
    let s = check_counters(&image(&[7; 10]), 0).unwrap();
    assert_eq!((s.value, s.advanced, s.pages), (7, 0, 10));
    let s = check_counters(&image(&[8, 8, 8, 7, 7]), 0).unwrap();
    assert_eq!((s.value, s.advanced), (7, 3));
    // 8-bit wraparound in the middle of a pass.
    let s = check_counters(&image(&[0, 0, 255, 255, 255]), 0).unwrap();
    assert_eq!((s.value, s.advanced), (255, 2));
    let s = check_counters(&image(&[0]), 0).unwrap();
    assert_eq!((s.value, s.advanced), (0, 0));
}

#[test]
fn checker_rejects_inconsistent_images() {
    // Two steps, a page from another round, a suffix ahead, a gap.
    for bad in [
        &[9u8, 8, 7][..],
        &[5, 5, 6, 5],
        &[5, 5, 6, 6],
        &[6, 5, 6],
        &[7, 7, 5, 5],
        &[0, 0, 254, 254],
    ] {
        assert!(check_counters(&image(bad), 0).is_err(), "{bad:?} accepted");
    }
    // Non-zero bytes besides the counter.
    let mut img = image(&[3, 3]);
    img[PAGE as usize + 100] = 1;
    let e = check_counters(&img, 0x100_0000).unwrap_err();
    assert!(e.contains("0x1001000"), "{e}");
    // Not whole pages.
    assert!(check_counters(&[0u8; 100], 0).is_err());
}

#[test]
fn boot_sector_assembles() {
    if !common::require("boot_sector_assembles", &["nasm"]) {
        return;
    }
    let ctx = TestCtx::new("boot_sector_assembles", Duration::from_secs(30));
    let img = assemble(&ctx);
    let bytes = std::fs::read(&img).unwrap();
    assert_eq!(&bytes[510..512], &[0x55, 0xaa], "boot signature");
    assert!(bytes[512..].iter().all(|&b| b == 0));
}
