//! Mapped-ram files against QEMU 10.0:
//!
//! * QEMU `migrate file:` (mapped-ram, multifd 4 channels, q35) -> `multifd
//!   send --mapped-ram-file` -> a QEMU destination over TCP: RAM identical;
//! * a booted guest -> `receive --snapshot` -> `send --to file:
//!   --mapped-ram` -> QEMU `migrate-incoming file:` -> the guest resumes
//!   and its checker passes;
//! * a running guest -> `receive --mapped-ram-file` (capture) -> a fresh
//!   QEMU loads the file -> the guest runs on (20 times in a row with
//!   `--ignored capture_live_guest_20x`).
//!
//! All with and without `offset=`. Without QEMU or nasm: a loud SKIPPED,
//! or a failure under `CI`.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::checker::check_counters_in_file;
use common::guest::{END, MEM_MIB, START, assemble, guest, volatile_pages, wait_markers};
use common::qemu::{MigEnd, Qemu, QemuConfig};
use common::{Params, TestCtx, compare_files, gen_image, qemu_binary};
use serde_json::json;

fn file_uri(path: &Path, offset: u64) -> String {
    if offset == 0 {
        format!("file:{}", path.display())
    } else {
        format!("file:{},offset={offset}", path.display())
    }
}

/// Mapped-ram and multifd on, `channels` channels.
fn set_mapped_ram(q: &mut Qemu, channels: u8) {
    q.set_multifd_caps(&Params::new(channels, "none", "multifd"), &["mapped-ram"]);
}

fn wait_done(q: &mut Qemu, what: &str, timeout: Duration) {
    let end = q.wait_migration(timeout);
    assert_eq!(end, MigEnd::Completed, "{what}\n{}", q.log());
}

#[test]
fn qemu_file_played_to_a_qemu_destination() {
    if !common::require("qemu_file_played_to_a_qemu_destination", &[&qemu_binary()]) {
        return;
    }
    let ctx = TestCtx::new("qemu_file_played", Duration::from_secs(120));
    let src_ram = ctx.path("src.ram");
    gen_image(&ctx, &src_ram, MEM_MIB, 5);
    for offset in [0u64, 4096] {
        // A source that completed a migration cannot start another.
        let mut src = Qemu::start(&ctx, QemuConfig::new("qemu-src", "q35", MEM_MIB, &src_ram));
        set_mapped_ram(&mut src, 4);
        let file = ctx.path(&format!("qemu-{offset}.mr"));
        src.cmd("migrate", json!({"uri": file_uri(&file, offset)}));
        wait_done(&mut src, "QEMU save", Duration::from_secs(30));
        drop(src);
        let dst_ram = ctx.path(&format!("dst-{offset}.ram"));
        let mut dst = Qemu::start(
            &ctx,
            QemuConfig::new("qemu-src", "q35", MEM_MIB, &src_ram)
                .as_destination("qemu-dst", &dst_ram),
        );
        dst.set_multifd(&Params::new(4, "none", "multifd"));
        let port = dst.migrate_incoming();
        let out = ctx.run_multifd(
            "play",
            &[
                "send".to_owned(),
                "--to".into(),
                format!("tcp:127.0.0.1:{port}"),
                "--mapped-ram-file".into(),
                file_uri(&file, offset),
                "--channels".into(),
                "4".into(),
                "--quiet".into(),
            ],
            Duration::from_secs(60),
        );
        let _ = out;
        dst.expect_completed(Duration::from_secs(30));
        compare_files(&src_ram, &dst_ram, &[])
            .unwrap_or_else(|e| panic!("offset {offset}: destination RAM: {e}"));
        eprintln!("[qemu_file_played] offset {offset}: completed, RAM identical");
    }
}

/// A booted guest's migration, stored as a snapshot by our receiver.
struct Stored {
    snap: std::path::PathBuf,
    m0: std::path::PathBuf,
    boot: std::path::PathBuf,
}

fn store_booted_guest(ctx: &TestCtx) -> Stored {
    let boot = assemble(ctx);
    let src_ram = ctx.path("src.ram");
    let src_serial = ctx.path("src.serial");
    let mut src = Qemu::start(ctx, guest("qemu-src", &src_ram, &boot, &src_serial));
    let p = Params::new(4, "none", "multifd");
    src.set_multifd(&p);
    src.cmd("cont", json!({}));
    wait_markers(&mut src, &src_serial, 3, Duration::from_secs(60));
    let snap = ctx.path("snap");
    let m0 = ctx.path("snap-m0.ram");
    let mut args = vec![
        "--ram".to_owned(),
        format!("m0={}", m0.display()),
        "--snapshot".into(),
        snap.display().to_string(),
        "--quiet".into(),
    ];
    args.extend(p.cli_args());
    let (mut recv, port) = common::start_receiver(ctx, "receive", &args);
    src.migrate(port);
    src.expect_completed(Duration::from_secs(60));
    let (st, killed) = recv.wait_or_kill(Duration::from_secs(30));
    assert!(st.success() && !killed, "receiver\n{}", recv.output_tail());
    check_counters_in_file(&m0, START, END).expect("stored guest RAM");
    Stored { snap, m0, boot }
}

/// Loads `file` into a fresh destination of the test guest, checks its
/// RAM against `expected` (if any), resumes it, waits for new markers and
/// runs the checker on its RAM.
fn load_and_resume(
    ctx: &TestCtx,
    name: &str,
    boot: &Path,
    file: &str,
    channels: u8,
    expected: Option<&Path>,
) {
    let dst_ram = ctx.path(&format!("{name}.ram"));
    let dst_serial = ctx.path(&format!("{name}.serial"));
    let mut cfg = guest(name, &dst_ram, boot, &dst_serial);
    cfg.incoming = true;
    let mut dst = Qemu::start(ctx, cfg);
    set_mapped_ram(&mut dst, channels);
    dst.cmd("migrate-incoming", json!({"uri": file}));
    wait_done(
        &mut dst,
        &format!("{name}: QEMU load of {file}"),
        Duration::from_secs(60),
    );
    if let Some(expected) = expected {
        compare_files(expected, &dst_ram, &volatile_pages())
            .unwrap_or_else(|e| panic!("{name}: loaded RAM: {e}"));
    }
    let before = check_counters_in_file(&dst_ram, START, END)
        .unwrap_or_else(|e| panic!("{name}: loaded RAM: {e}"));
    dst.cmd("cont", json!({}));
    wait_markers(&mut dst, &dst_serial, 3, Duration::from_secs(30));
    dst.cmd("stop", json!({}));
    let after = check_counters_in_file(&dst_ram, START, END)
        .unwrap_or_else(|e| panic!("{name}: after resuming: {e}"));
    assert_ne!(
        before.progress(),
        after.progress(),
        "{name}: the guest did not run"
    );
}

#[test]
fn our_save_loaded_by_qemu_and_the_guest_resumes() {
    if !common::require("our_save_loaded_by_qemu", &[&qemu_binary(), "nasm"]) {
        return;
    }
    let ctx = TestCtx::new("our_save_loaded_by_qemu", Duration::from_secs(180));
    let stored = store_booted_guest(&ctx);
    for offset in [0u64, 4096] {
        let file = ctx.path(&format!("ours-{offset}.mr"));
        if offset > 0 {
            std::fs::write(&file, vec![0xab; offset as usize]).unwrap();
        }
        ctx.run_multifd(
            "save",
            &[
                "send".to_owned(),
                "--to".into(),
                file_uri(&file, offset),
                "--mapped-ram".into(),
                "--snapshot".into(),
                stored.snap.display().to_string(),
                "--ram".into(),
                format!("m0={}", stored.m0.display()),
                "--channels".into(),
                "4".into(),
                "--quiet".into(),
            ],
            Duration::from_secs(60),
        );
        load_and_resume(
            &ctx,
            &format!("qemu-dst-{offset}"),
            &stored.boot,
            &file_uri(&file, offset),
            4,
            Some(&stored.m0),
        );
        eprintln!(
            "[our_save_loaded_by_qemu] offset {offset}: completed, RAM identical, guest resumed"
        );
    }
}

/// A running guest captured by `receive --mapped-ram-file`, then loaded
/// by a fresh QEMU that resumes it.
fn capture_live_guest(name: &str, p: Params, offset: u64, load_channels: u8) -> Duration {
    let t0 = Instant::now();
    let ctx = TestCtx::new(name, Duration::from_secs(120));
    let boot = assemble(&ctx);
    let src_ram = ctx.path("src.ram");
    let src_serial = ctx.path("src.serial");
    let mut src = Qemu::start(&ctx, guest("qemu-src", &src_ram, &boot, &src_serial));
    src.set_multifd(&p);
    src.cmd("cont", json!({}));
    wait_markers(&mut src, &src_serial, 3, Duration::from_secs(60));
    let file = ctx.path("capture.mr");
    if offset > 0 {
        std::fs::write(&file, vec![0x5a; offset as usize]).unwrap();
    }
    let mut args = vec![
        "--mapped-ram-file".to_owned(),
        file_uri(&file, offset),
        "--accept-timeout".into(),
        "30".into(),
        "--quiet".into(),
    ];
    args.extend(p.cli_args());
    let (mut recv, port) = common::start_receiver(&ctx, "capture", &args);
    src.migrate(port);
    let mut end = src.wait_migration(Duration::from_secs(10));
    if matches!(end, MigEnd::TimedOut(_)) {
        let _ = src.try_cmd("migrate-set-parameters", json!({"downtime-limit": 60_000}));
        end = src.wait_migration(ctx.remaining());
    }
    assert_eq!(
        end,
        MigEnd::Completed,
        "[{name}] source\n{}\n{}",
        src.log(),
        recv.output_tail()
    );
    let (st, killed) = recv.wait_or_kill(Duration::from_secs(30));
    assert!(
        st.success() && !killed,
        "[{name}] capture\n{}",
        recv.output_tail()
    );
    drop(src);
    if offset > 0 {
        let head = common::read_range(&file, 0, offset);
        assert!(
            head.iter().all(|&b| b == 0x5a),
            "[{name}] bytes before the offset changed"
        );
    }
    load_and_resume(
        &ctx,
        "qemu-dst",
        &boot,
        &file_uri(&file, offset),
        load_channels,
        None,
    );
    let took = t0.elapsed();
    eprintln!("[{name}] ok in {:.1} s", took.as_secs_f64());
    took
}

#[test]
fn capture_live_guest_into_a_file_qemu_loads() {
    if !common::require("capture_live_guest", &[&qemu_binary(), "nasm"]) {
        return;
    }
    capture_live_guest(
        "capture_live_guest",
        Params::new(4, "none", "multifd"),
        0,
        4,
    );
}

#[test]
#[ignore = "slow: 20 captures of a live guest"]
fn capture_live_guest_20x() {
    if !common::require("capture_live_guest_20x", &[&qemu_binary(), "nasm"]) {
        return;
    }
    let variants = [
        (Params::new(4, "none", "multifd"), 0u64, 4u8),
        (Params::new(2, "zstd", "legacy"), 4096, 1),
        (Params::new(8, "zlib", "multifd"), 1 << 20, 8),
        (Params::new(1, "none", "none"), 100, 2),
    ];
    let t0 = Instant::now();
    let mut failures = Vec::new();
    let mut times = Vec::new();
    for i in 0..20 {
        let (p, offset, load) = variants[i % variants.len()];
        let name = format!("capture-{i:02}-{}-off{offset}", p.label());
        match std::panic::catch_unwind(|| capture_live_guest(&name, p, offset, load)) {
            Ok(t) => times.push(t.as_secs_f64()),
            Err(_) => failures.push(name),
        }
    }
    times.sort_by(f64::total_cmp);
    eprintln!(
        "capture_live_guest_20x: {}/20 passed with accel {} in {:.1} s (per run: min {:.1} s, median {:.1} s, max {:.1} s)",
        times.len(),
        common::accel(),
        t0.elapsed().as_secs_f64(),
        times.first().copied().unwrap_or(0.0),
        times.get(times.len() / 2).copied().unwrap_or(0.0),
        times.last().copied().unwrap_or(0.0),
    );
    assert!(failures.is_empty(), "failed runs: {failures:?}");
}
