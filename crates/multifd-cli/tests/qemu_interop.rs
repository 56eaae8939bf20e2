//! Interoperability with a real QEMU 10.0 (`qemu-system-x86_64`).
//!
//! Every test starts its own QEMU(s) and `multifd` processes on 127.0.0.1,
//! with guest RAM in shared files under /dev/shm, and needs byte-identical
//! RAM on the receiving side. Sources are paused (`-S`), so RAM does not
//! change. Each test is bounded in time (a watchdog kills its processes)
//! and removes its files.
//!
//! ```text
//! cargo test -p multifd-cli --test qemu_interop                         # CI slice
//! cargo test -p multifd-cli --test qemu_interop -- --ignored full_matrix --nocapture
//! MULTIFD_TEST_ACCEL=tcg cargo test -p multifd-cli --test qemu_interop  # force TCG
//! ```
//! Without QEMU every test prints a loud `SKIPPED: ...` line, or fails
//! when the environment variable `CI` is set (as `.ci/run` does).
//! Environment: `MULTIFD_TEST_ACCEL=kvm|tcg`, `QEMU=path`, `MULTIFD_BIN=path`
//! (another `multifd` build), `MULTIFD_TEST_KEEP=1` (keep the temp dirs).

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::qemu::{MigEnd, Qemu, QemuConfig, QmpError};
use common::{Params, Proc, TestCtx, compare_files, gen_image, qemu_binary};
use serde_json::json;

/// Time budget of one test (generous: the machine is shared; a healthy run
/// takes 1-10 s).
const BUDGET: Duration = Duration::from_secs(90);
/// Guest size of the CI slice.
const SLICE_MIB: u64 = 64;
/// Guest size of the full matrix.
const MATRIX_MIB: u64 = 32;

/// Whether QEMU is installed: if not, a loud SKIPPED, or a failure when
/// `CI` is set.
fn qemu_available() -> bool {
    let test = std::thread::current()
        .name()
        .unwrap_or("qemu_interop")
        .to_owned();
    common::require(&test, &[&qemu_binary()])
}

fn listen_uri(port: u16) -> String {
    format!("tcp:127.0.0.1:{port}")
}

/// Starts `multifd receive` with `p` on a port it picks; returns it and the port.
fn start_receiver(
    ctx: &TestCtx,
    p: &Params,
    ram: &Path,
    snapshot: Option<&Path>,
    extra: &[&str],
) -> (Proc, u16) {
    let mut args: Vec<String> = vec![
        "--ram".into(),
        format!("m0={}", ram.display()),
        "--accept-timeout".into(),
        "30".into(),
        "--quiet".into(),
    ];
    if let Some(dir) = snapshot {
        args.extend(["--snapshot".into(), dir.display().to_string()]);
    }
    args.extend(p.cli_args());
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    common::start_receiver(ctx, "receive", &args)
}

/// Starts `multifd send` to 127.0.0.1:port with `source` (`--ram m0=FILE`
/// or `--snapshot DIR` arguments).
fn start_sender(ctx: &TestCtx, p: &Params, port: u16, source: &[String], extra: &[&str]) -> Proc {
    let mut args: Vec<String> = vec![
        "send".into(),
        "--to".into(),
        listen_uri(port),
        "--quiet".into(),
    ];
    args.extend(source.iter().cloned());
    args.extend(p.cli_args());
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    ctx.multifd("send", &args)
}

/// Waits for our process to exit successfully within the test budget.
fn expect_success(ctx: &TestCtx, proc: &mut Proc, other: Option<&Qemu>) {
    let (st, killed) = proc.wait_or_kill(ctx.remaining());
    assert!(
        st.success() && !killed,
        "[{}] {} ended {st}{}\n{}\n{}",
        ctx.name,
        proc.name,
        if killed {
            " (killed: did not exit in time)"
        } else {
            ""
        },
        proc.output_tail(),
        other.map(Qemu::log).unwrap_or_default()
    );
}

/// Waits for our process to fail (non-zero exit) within `timeout`;
/// returns its stderr.
fn expect_failure(proc: &mut Proc, timeout: Duration) -> String {
    let (st, killed) = proc.wait_or_kill(timeout);
    assert!(
        !killed,
        "{} did not exit within {timeout:?} (hangs)\n{}",
        proc.name,
        proc.output_tail()
    );
    assert!(
        !st.success(),
        "{} succeeded but should have failed\n{}",
        proc.name,
        proc.output_tail()
    );
    proc.stderr_text()
}

/// QEMU source -> `multifd receive`; the received RAM must equal the source's.
fn qemu_to_us(name: &str, p: Params, machine: &str, mib: u64, seed: u64) {
    qemu_to_us_with(name, p, machine, mib, |ctx, img| {
        gen_image(ctx, img, mib, seed);
    });
}

/// [`qemu_to_us`] with an image made by `make_image`.
fn qemu_to_us_with(
    name: &str,
    p: Params,
    machine: &str,
    mib: u64,
    make_image: impl FnOnce(&TestCtx, &Path),
) {
    let ctx = TestCtx::new(name, BUDGET);
    let t0 = Instant::now();
    let img = ctx.path("src.ram");
    make_image(&ctx, &img);
    let mut cfg = QemuConfig::new("qemu-src", machine, mib, &img);
    cfg.flush_each_section = p.flush_each_section;
    let mut src = Qemu::start(&ctx, cfg);
    src.set_multifd(&p);
    let dst = ctx.path("dst.ram");
    let snap = ctx.path("snap");
    let (mut recv, port) =
        start_receiver(&ctx, &p, &dst, (machine != "none").then_some(&*snap), &[]);
    src.migrate(port);
    let end = src.wait_migration(ctx.remaining());
    if end != MigEnd::Completed {
        recv.wait_or_kill(Duration::from_secs(1));
        panic!(
            "[{name}] QEMU source: {end:?}\n{}\n{}",
            src.log(),
            recv.output_tail()
        );
    }
    expect_success(&ctx, &mut recv, Some(&src));
    if let Err(e) = compare_files(&img, &dst, &[]) {
        panic!("[{name}] {e}");
    }
    eprintln!("[{name}] ok in {:.2} s", t0.elapsed().as_secs_f64());
}

/// `multifd send` -> QEMU destination; the destination RAM must equal the image.
fn us_to_qemu(name: &str, p: Params, mib: u64, seed: u64) {
    us_to_qemu_with(name, p, mib, |ctx, img| gen_image(ctx, img, mib, seed));
}

/// [`us_to_qemu`] with an image made by `make_image`.
fn us_to_qemu_with(name: &str, p: Params, mib: u64, make_image: impl FnOnce(&TestCtx, &Path)) {
    let ctx = TestCtx::new(name, BUDGET);
    let t0 = Instant::now();
    let img = ctx.path("src.ram");
    make_image(&ctx, &img);
    let dst_ram = ctx.path("dst.ram");
    let mut cfg = QemuConfig::new("qemu-dst", "none", mib, &dst_ram);
    cfg.incoming = true;
    cfg.flush_each_section = p.flush_each_section;
    let mut dst = Qemu::start(&ctx, cfg);
    dst.set_multifd(&p);
    let port = dst.migrate_incoming();
    let mut send = start_sender(
        &ctx,
        &p,
        port,
        &["--ram".into(), format!("m0={}", img.display())],
        &[],
    );
    expect_success(&ctx, &mut send, Some(&dst));
    let end = dst.wait_migration(ctx.remaining());
    assert_eq!(
        end,
        MigEnd::Completed,
        "[{name}] QEMU destination\n{}",
        dst.log()
    );
    if let Err(e) = compare_files(&img, &dst_ram, &[]) {
        panic!("[{name}] {e}");
    }
    eprintln!("[{name}] ok in {:.2} s", t0.elapsed().as_secs_f64());
}

// ---------------------------------------------------------------------------
// CI slice: representative (channels, compression, zero-page) both ways.

macro_rules! slice {
    ($($q2us:ident, $us2q:ident: ($ch:expr, $comp:expr, $zp:expr);)*) => {$(
        #[test]
        fn $q2us() {
            if !qemu_available() { return; }
            qemu_to_us(stringify!($q2us), Params::new($ch, $comp, $zp), "none", SLICE_MIB, 1);
        }
        #[test]
        fn $us2q() {
            if !qemu_available() { return; }
            us_to_qemu(stringify!($us2q), Params::new($ch, $comp, $zp), SLICE_MIB, 2);
        }
    )*};
}

slice! {
    qemu_to_us_1ch_none_multifd, us_to_qemu_1ch_none_multifd: (1, "none", "multifd");
    qemu_to_us_2ch_zlib_legacy, us_to_qemu_2ch_zlib_legacy: (2, "zlib", "legacy");
    qemu_to_us_4ch_zstd_none, us_to_qemu_4ch_zstd_none: (4, "zstd", "none");
    qemu_to_us_16ch_none_multifd, us_to_qemu_16ch_none_multifd: (16, "none", "multifd");
    qemu_to_us_8ch_zstd_multifd, us_to_qemu_8ch_zstd_multifd: (8, "zstd", "multifd");
}

// ---------------------------------------------------------------------------
// Zero-only packets: with zero-page-detection=multifd a QEMU source sends a
// packet whose 128 pages are all zero as zero_pages=128, normal_pages=0 and,
// for zlib/zstd, next_packet_size=0 (no payload at all). Real guests are
// mostly such pages; the generated image has few, so half of this one is
// left zero.

/// A generated image of `mib` MiB whose second half is zero.
fn half_zero_image(ctx: &TestCtx, img: &Path, mib: u64) {
    gen_image(ctx, img, mib / 2, 13);
    std::fs::OpenOptions::new()
        .write(true)
        .open(img)
        .and_then(|f| f.set_len(mib * common::MIB))
        .expect("extending the image with zeros");
}

/// QEMU source -> us on an image whose second half is zero.
fn qemu_to_us_half_zero(name: &str, p: Params) {
    qemu_to_us_with(name, p, "none", SLICE_MIB, |ctx, img| {
        half_zero_image(ctx, img, SLICE_MIB);
    });
}

#[test]
fn qemu_to_us_zero_only_packets_none() {
    if !qemu_available() {
        return;
    }
    qemu_to_us_half_zero(
        "qemu_to_us_zero_only_packets_none",
        Params::new(2, "none", "multifd"),
    );
}

#[test]
fn qemu_to_us_zero_only_packets_zlib() {
    if !qemu_available() {
        return;
    }
    qemu_to_us_half_zero(
        "qemu_to_us_zero_only_packets_zlib",
        Params::new(2, "zlib", "multifd"),
    );
}

#[test]
fn qemu_to_us_zero_only_packets_zstd() {
    if !qemu_available() {
        return;
    }
    qemu_to_us_half_zero(
        "qemu_to_us_zero_only_packets_zstd",
        Params::new(2, "zstd", "multifd"),
    );
}

/// Our sender's zero-only packets into QEMU (which asserts that a
/// compressed zero-only packet has no payload).
#[test]
fn us_to_qemu_zero_only_packets() {
    if !qemu_available() {
        return;
    }
    for comp in ["none", "zlib", "zstd"] {
        let name = format!("us_to_qemu_zero_only_packets_{comp}");
        us_to_qemu_with(
            &name,
            Params::new(2, comp, "multifd"),
            SLICE_MIB,
            |ctx, img| {
                half_zero_image(ctx, img, SLICE_MIB);
            },
        );
    }
}

// ---------------------------------------------------------------------------
// Per-section flushing (multifd-flush-after-each-section=on) both ways.

#[test]
fn qemu_to_us_flush_after_each_section() {
    if !qemu_available() {
        return;
    }
    let p = Params {
        flush_each_section: true,
        ..Params::new(4, "none", "multifd")
    };
    qemu_to_us(
        "qemu_to_us_flush_after_each_section",
        p,
        "none",
        SLICE_MIB,
        3,
    );
}

#[test]
fn us_to_qemu_flush_after_each_section() {
    if !qemu_available() {
        return;
    }
    let p = Params {
        flush_each_section: true,
        ..Params::new(4, "zlib", "multifd")
    };
    us_to_qemu("us_to_qemu_flush_after_each_section", p, SLICE_MIB, 4);
}

// ---------------------------------------------------------------------------
// q35: QEMU -> us -> snapshot -> `send --snapshot` -> fresh QEMU.

#[test]
fn q35_store_and_forward_snapshot() {
    if !qemu_available() {
        return;
    }
    let ctx = TestCtx::new("q35_store_and_forward_snapshot", BUDGET);
    let img = ctx.path("src.ram");
    gen_image(&ctx, &img, SLICE_MIB, 5);
    let capture = Params::new(4, "none", "multifd");
    let src_cfg = QemuConfig::new("qemu-src", "q35", SLICE_MIB, &img);
    let mut src = Qemu::start(&ctx, src_cfg.clone());
    src.set_multifd(&capture);
    let snap = ctx.path("snap");
    let snap_m0 = ctx.path("snap-m0.ram");
    let (mut recv, port) = start_receiver(&ctx, &capture, &snap_m0, Some(&snap), &[]);
    src.migrate(port);
    src.expect_completed(ctx.remaining());
    expect_success(&ctx, &mut recv, Some(&src));
    compare_files(&img, &snap_m0, &[]).unwrap();
    for f in ["manifest.json", "prefix.bin", "tail.bin"] {
        assert!(snap.join(f).is_file(), "snapshot lacks {f}");
    }
    let n_blocks = std::fs::read_dir(snap.join("ram"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert!(
        n_blocks >= 2,
        "a q35 guest has more RAM blocks than m0 (got {n_blocks} in DIR/ram)"
    );
    let summary = ctx.run_multifd(
        "inspect",
        &["inspect".into(), snap.display().to_string()],
        Duration::from_secs(20),
    );
    assert!(
        summary.contains("q35"),
        "inspect output names no q35 machine:\n{summary}"
    );
    // The source is done: its QMP says completed; end it now.
    drop(src);

    // Replay with other parameters than the capture: the snapshot does not
    // depend on how it was received.
    let replay = Params::new(2, "zstd", "legacy");
    let dst_ram = ctx.path("dst.ram");
    let mut dst = Qemu::start(&ctx, src_cfg.as_destination("qemu-dst", &dst_ram));
    dst.set_multifd(&replay);
    let port = dst.migrate_incoming();
    let mut send = start_sender(
        &ctx,
        &replay,
        port,
        &[
            "--snapshot".into(),
            snap.display().to_string(),
            // m0 was received outside the snapshot directory.
            "--ram".into(),
            format!("m0={}", snap_m0.display()),
        ],
        &[],
    );
    expect_success(&ctx, &mut send, Some(&dst));
    dst.expect_completed(ctx.remaining());
    compare_files(&img, &dst_ram, &[]).unwrap();
    // The destination is a usable paused VM.
    // (It inherits the source's run state: "prelaunch", as that one never ran.)
    let status = dst.cmd("query-status", json!({}));
    assert_eq!(status["running"], false, "destination state {status}");
    assert!(
        matches!(status["status"].as_str(), Some("paused" | "prelaunch")),
        "destination state {status}"
    );
}

// ---------------------------------------------------------------------------
// UUIDs: a QEMU destination checks the initial packets against its -uuid.

const UUID_A: &str = "12345678-9abc-def0-1122-334455667788";
/// Malformed on purpose: 9 hex digits in the first group.
const UUID_TYPO: &str = "8765a4321-cba9-0fed-2211-887766554433";

#[test]
fn us_to_qemu_uuid_match() {
    if !qemu_available() {
        return;
    }
    let ctx = TestCtx::new("us_to_qemu_uuid_match", BUDGET);
    let p = Params::new(2, "none", "multifd");
    let img = ctx.path("src.ram");
    gen_image(&ctx, &img, SLICE_MIB, 6);
    let dst_ram = ctx.path("dst.ram");
    let mut cfg = QemuConfig::new("qemu-dst", "none", SLICE_MIB, &dst_ram);
    cfg.incoming = true;
    cfg.uuid = Some(UUID_A.into());
    let mut dst = Qemu::start(&ctx, cfg);
    dst.set_multifd(&p);
    let port = dst.migrate_incoming();
    let src = ["--ram".into(), format!("m0={}", img.display())];
    let mut send = start_sender(&ctx, &p, port, &src, &["--uuid", UUID_A]);
    expect_success(&ctx, &mut send, Some(&dst));
    dst.expect_completed(ctx.remaining());
    compare_files(&img, &dst_ram, &[]).unwrap();
}

/// Our sender with the wrong (or no) UUID: the QEMU destination must refuse
/// it, and nothing may hang.
fn us_to_qemu_uuid_mismatch(name: &str, sender_uuid: Option<&str>) {
    let ctx = TestCtx::new(name, BUDGET);
    let p = Params::new(2, "none", "multifd");
    let img = ctx.path("src.ram");
    gen_image(&ctx, &img, SLICE_MIB, 7);
    let dst_ram = ctx.path("dst.ram");
    let mut cfg = QemuConfig::new("qemu-dst", "none", SLICE_MIB, &dst_ram);
    cfg.incoming = true;
    cfg.uuid = Some(UUID_A.into());
    let mut dst = Qemu::start(&ctx, cfg);
    dst.set_multifd(&p);
    let port = dst.migrate_incoming();
    let src = ["--ram".into(), format!("m0={}", img.display())];
    let extra: Vec<&str> = sender_uuid.map(|u| vec!["--uuid", u]).unwrap_or_default();
    let mut send = start_sender(&ctx, &p, port, &src, &extra);
    let (st, killed) = send.wait_or_kill(Duration::from_secs(30));
    let end = dst.wait_migration(Duration::from_secs(15));
    let qemu_log = dst.proc.stderr_text();
    eprintln!(
        "[{name}] sender: {st}{}; QEMU destination: {end:?}\nsender stderr: {}\nQEMU: {qemu_log}",
        if killed { " (killed)" } else { "" },
        send.stderr_text().trim()
    );
    assert!(!killed, "[{name}] our sender hangs\n{}", send.output_tail());
    assert!(
        !st.success(),
        "[{name}] our sender reports success although QEMU refused its UUID\n{}",
        dst.log()
    );
    assert!(
        matches!(end, MigEnd::Failed(_) | MigEnd::Exited(_)),
        "[{name}] QEMU destination did not fail: {end:?}\n{}",
        dst.log()
    );
    assert!(
        qemu_log.contains("uuid"),
        "[{name}] QEMU does not name the UUID mismatch:\n{qemu_log}"
    );
}

#[test]
fn us_to_qemu_uuid_mismatch_wrong() {
    if !qemu_available() {
        return;
    }
    us_to_qemu_uuid_mismatch(
        "us_to_qemu_uuid_mismatch_wrong",
        Some("00000000-0000-0000-0000-000000000001"),
    );
}

#[test]
fn us_to_qemu_uuid_mismatch_missing() {
    if !qemu_available() {
        return;
    }
    us_to_qemu_uuid_mismatch("us_to_qemu_uuid_mismatch_missing", None);
}

/// A QEMU source with `-uuid` sends its own UUID; our receiver checks it.
#[test]
fn qemu_to_us_uuid() {
    if !qemu_available() {
        return;
    }
    let ctx = TestCtx::new("qemu_to_us_uuid", BUDGET);
    let p = Params::new(2, "none", "multifd");
    let img = ctx.path("src.ram");
    gen_image(&ctx, &img, SLICE_MIB, 8);
    let mut cfg = QemuConfig::new("qemu-src", "none", SLICE_MIB, &img);
    cfg.uuid = Some(UUID_A.into());
    let mut src = Qemu::start(&ctx, cfg);
    src.set_multifd(&p);
    // Right UUID: completes.
    let dst = ctx.path("dst.ram");
    let (mut recv, port) = start_receiver(&ctx, &p, &dst, None, &["--uuid", UUID_A]);
    src.migrate(port);
    src.expect_completed(ctx.remaining());
    expect_success(&ctx, &mut recv, Some(&src));
    compare_files(&img, &dst, &[]).unwrap();
    drop(src);

    // Default (zero) UUID on our side: refused, naming both UUIDs.
    let mut cfg = QemuConfig::new("qemu-src2", "none", SLICE_MIB, &img);
    cfg.uuid = Some(UUID_A.into());
    let mut src = Qemu::start(&ctx, cfg);
    src.set_multifd(&p);
    let dst2 = ctx.path("dst2.ram");
    let (mut recv, port) = start_receiver(&ctx, &p, &dst2, None, &[]);
    src.migrate(port);
    let err = expect_failure(&mut recv, Duration::from_secs(30));
    assert!(
        err.contains("uuid") && err.contains(UUID_A),
        "receiver error does not name the UUID mismatch:\n{err}"
    );
    let end = src.wait_migration(Duration::from_secs(20));
    assert!(
        matches!(end, MigEnd::Failed(_)),
        "QEMU source: {end:?}\n{}",
        src.log()
    );
}

#[test]
fn uuid_typo_is_rejected() {
    // The CLI must refuse a malformed UUID before connecting anywhere.
    let ctx = TestCtx::new("uuid_typo_is_rejected", Duration::from_secs(20));
    let mut p = ctx.multifd(
        "send",
        &[
            "send",
            "--to",
            "tcp:127.0.0.1:9",
            "--ram",
            "m0=/nonexistent",
            "--uuid",
            UUID_TYPO,
        ],
    );
    let err = expect_failure(&mut p, Duration::from_secs(10));
    assert!(err.to_lowercase().contains("uuid"), "{err}");
}

// ---------------------------------------------------------------------------
// Unsupported configurations from a QEMU source: both sides end, we say why.

/// Runs a QEMU source with `src_p` (plus `extra_caps`) into our receiver
/// configured with `recv_p`; the receiver must fail with a message
/// containing one of `needles`, and the QEMU source must end `failed`.
fn qemu_to_us_must_fail(name: &str, src_p: Params, recv_p: Params, needles: &[&str]) {
    let ctx = TestCtx::new(name, BUDGET);
    let img = ctx.path("src.ram");
    gen_image(&ctx, &img, SLICE_MIB, 9);
    let mut src = Qemu::start(&ctx, QemuConfig::new("qemu-src", "none", SLICE_MIB, &img));
    src.set_multifd(&src_p);
    let dst = ctx.path("dst.ram");
    let (mut recv, port) = start_receiver(&ctx, &recv_p, &dst, None, &[]);
    src.migrate(port);
    let err = expect_failure(&mut recv, Duration::from_secs(30));
    let end = src.wait_migration(Duration::from_secs(20));
    eprintln!(
        "[{name}] receiver: {}\n[{name}] QEMU source: {end:?}",
        err.trim()
    );
    let lower = err.to_lowercase();
    assert!(
        needles.iter().any(|n| lower.contains(n)),
        "[{name}] receiver error names none of {needles:?}:\n{err}"
    );
    if !matches!(end, MigEnd::Failed(_)) {
        src.proc.kill();
        panic!(
            "[{name}] QEMU source did not end failed: {end:?}\n{}",
            src.log()
        );
    }
}

#[test]
fn qemu_more_channels_than_receiver() {
    if !qemu_available() {
        return;
    }
    qemu_to_us_must_fail(
        "qemu_more_channels_than_receiver",
        Params::new(4, "none", "multifd"),
        Params::new(2, "none", "multifd"),
        &["channel"],
    );
}

#[test]
fn qemu_16_channels_receiver_1() {
    if !qemu_available() {
        return;
    }
    qemu_to_us_must_fail(
        "qemu_16_channels_receiver_1",
        Params::new(16, "none", "multifd"),
        Params::new(1, "none", "multifd"),
        &["channel"],
    );
}

/// Fewer channels than we wait for: we give up after the handshake timeout
/// (QEMU keeps waiting for us, so its failure follows ours), and must say
/// that channels are missing.
#[test]
fn qemu_fewer_channels_than_receiver() {
    if !qemu_available() {
        return;
    }
    qemu_to_us_must_fail(
        "qemu_fewer_channels_than_receiver",
        Params::new(2, "none", "multifd"),
        Params::new(4, "none", "multifd"),
        &["channel"],
    );
}

#[test]
fn qemu_compression_zstd_receiver_none() {
    if !qemu_available() {
        return;
    }
    qemu_to_us_must_fail(
        "qemu_compression_zstd_receiver_none",
        Params::new(2, "zstd", "multifd"),
        Params::new(2, "none", "multifd"),
        &["compression", "zstd"],
    );
}

#[test]
fn qemu_compression_none_receiver_zlib() {
    if !qemu_available() {
        return;
    }
    qemu_to_us_must_fail(
        "qemu_compression_none_receiver_zlib",
        Params::new(2, "none", "multifd"),
        Params::new(2, "zlib", "multifd"),
        &["compression", "zlib"],
    );
}

/// QEMU itself cannot tell the flush modes apart (a mismatch corrupts RAM
/// silently, wire doc 5.5); our receiver must refuse both mismatches.
#[test]
fn qemu_flush_per_section_receiver_per_round() {
    if !qemu_available() {
        return;
    }
    let name = "qemu_flush_per_section_receiver_per_round";
    let ctx = TestCtx::new(name, BUDGET);
    let img = ctx.path("src.ram");
    gen_image(&ctx, &img, SLICE_MIB, 14);
    let p = Params::new(2, "none", "multifd");
    let mut cfg = QemuConfig::new("qemu-src", "none", SLICE_MIB, &img);
    cfg.flush_each_section = true;
    let mut src = Qemu::start(&ctx, cfg);
    src.set_multifd(&p);
    let (mut recv, port) = start_receiver(&ctx, &p, &ctx.path("dst.ram"), None, &[]);
    src.migrate(port);
    let err = expect_failure(&mut recv, Duration::from_secs(30));
    assert!(
        err.contains("flush"),
        "receiver error does not name the flush mode:\n{err}"
    );
    let end = src.wait_migration(Duration::from_secs(20));
    assert!(
        matches!(end, MigEnd::Failed(_)),
        "QEMU source: {end:?}\n{}",
        src.log()
    );
}

#[test]
fn qemu_flush_per_round_receiver_per_section() {
    if !qemu_available() {
        return;
    }
    let recv_p = Params {
        flush_each_section: true,
        ..Params::new(2, "none", "multifd")
    };
    qemu_to_us_must_fail(
        "qemu_flush_per_round_receiver_per_section",
        Params::new(2, "none", "multifd"),
        recv_p,
        &["flush"],
    );
}

/// Our zstd sender into a QEMU destination expecting no compression: QEMU
/// rejects the packet flags ("multifd N: flags received 4 flags expected
/// 0"); our sender must end with an error, not hang. Whether QEMU exits at
/// once or stays stuck in its sync barrier with the channels shut down (see
/// [`sender_fails_when_destination_shuts_channels_down`]) depends on timing,
/// so this runs up to 4 times.
#[test]
fn us_to_qemu_compression_mismatch() {
    if !qemu_available() {
        return;
    }
    for attempt in 0..4 {
        let name = format!("us_to_qemu_compression_mismatch-{attempt}");
        let ctx = TestCtx::new(&name, BUDGET);
        let img = ctx.path("src.ram");
        gen_image(&ctx, &img, SLICE_MIB, 15);
        let dst_ram = ctx.path("dst.ram");
        let mut cfg = QemuConfig::new("qemu-dst", "none", SLICE_MIB, &dst_ram);
        cfg.incoming = true;
        let mut dst = Qemu::start(&ctx, cfg);
        dst.set_multifd(&Params::new(2, "none", "multifd"));
        let port = dst.migrate_incoming();
        let src = ["--ram".into(), format!("m0={}", img.display())];
        let mut send = start_sender(&ctx, &Params::new(2, "zstd", "multifd"), port, &src, &[]);
        let (st, killed) = send.wait_or_kill(Duration::from_secs(20));
        let end = dst.wait_migration(Duration::from_secs(10));
        eprintln!(
            "[{name}] sender: {st}{}: {}\n[{name}] QEMU destination: {end:?}: {}",
            if killed { " (killed after 20 s)" } else { "" },
            send.stderr_text().trim(),
            dst.proc.stderr_text().trim()
        );
        assert!(!killed, "[{name}] our sender hangs\n{}", send.output_tail());
        assert!(
            !st.success(),
            "[{name}] our sender reports success\n{}",
            dst.log()
        );
        assert_ne!(
            end,
            MigEnd::Completed,
            "[{name}] QEMU completed a mismatched migration"
        );
    }
}

/// What a QEMU 10.0 destination does to the multifd channels when one of
/// them fails (e.g. "multifd 1: flags received 4 flags expected 0" in
/// [`us_to_qemu_compression_mismatch`]): `multifd_recv_terminate_threads()`
/// shuts every channel socket down (`shutdown(SHUT_RDWR)`: the sender sees
/// a FIN) but keeps the descriptors open and never reads again, and its main
/// loop may stay blocked in the sync barrier (wire doc 5.6). When a
/// channel's receive queue was full at that moment, the window stays zero:
/// no new data reaches the shut-down socket, so the kernel never answers
/// with a reset. Seen with `ss` on a hung run: the sender's channel sockets
/// in CLOSE-WAIT with ~4 MiB unsent, QEMU's in FIN-WAIT-2 with a full
/// receive queue, the sender's channel threads blocked in writev
/// (send/worker.rs) and its main thread in `Dispatcher::dispatch`.
/// A sender that only writes then blocks forever; it must notice the
/// peer's FIN (a QEMU destination never sends anything on a multifd
/// channel) and fail.
///
/// This fake destination does exactly that, without QEMU: it takes the
/// initial packets, lets the channels' receive queues fill, then shuts the
/// channel sockets down and holds them (and the main channel) open.
#[test]
fn sender_fails_when_destination_shuts_channels_down() {
    use std::io::Read;
    use std::net::{Shutdown, TcpListener, TcpStream};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    let name = "sender_fails_when_destination_shuts_channels_down";
    let ctx = TestCtx::new(name, BUDGET);
    let img = ctx.path("src.ram");
    gen_image(&ctx, &img, SLICE_MIB, 16);
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    listener.set_nonblocking(true).expect("nonblocking");
    // (is a multifd channel, socket)
    let held: Arc<Mutex<Vec<(bool, TcpStream)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let acceptor = {
        let (held, stop) = (held.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let Ok((mut s, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                let _ = s.set_nonblocking(false);
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let mut magic = [0u8; 4];
                if s.read_exact(&mut magic).is_err() {
                    continue;
                }
                let multifd = magic == 0x1122_3344u32.to_be_bytes();
                if multifd {
                    let mut rest = [0u8; 60];
                    let _ = s.read_exact(&mut rest);
                }
                held.lock().unwrap().push((multifd, s));
            }
        })
    };
    let p = Params::new(2, "none", "multifd");
    let mut send = start_sender(
        &ctx,
        &p,
        port,
        &["--ram".into(), format!("m0={}", img.display())],
        &[],
    );
    let connected = common::poll(Duration::from_secs(10), Duration::from_millis(10), || {
        (held.lock().unwrap().len() == 3).then_some(())
    });
    // Let the sender fill the receive queues, then fail like QEMU.
    std::thread::sleep(Duration::from_secs(1));
    for (multifd, s) in held.lock().unwrap().iter() {
        if *multifd {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
    let (st, killed) = send.wait_or_kill(Duration::from_secs(20));
    stop.store(true, Ordering::Relaxed);
    let _ = acceptor.join();
    drop(held);
    assert!(
        connected.is_some(),
        "[{name}] the sender did not open 3 connections\n{}",
        send.output_tail()
    );
    assert!(
        !killed,
        "[{name}] our sender hangs (blocked writing to multifd channels the destination shut down)\n{}",
        send.output_tail()
    );
    assert!(
        !st.success(),
        "[{name}] our sender reports success\n{}",
        send.output_tail()
    );
    eprintln!("[{name}] sender: {st}: {}", send.stderr_text().trim());
}

/// `mapped-ram` is a file-migration format. QEMU 10.0 refuses it on a
/// socket URI before connecting, so it can never reach our receiver; this
/// test pins that down (and, should a QEMU ever allow it, checks that our
/// receiver fails cleanly instead).
#[test]
fn qemu_mapped_ram_over_tcp() {
    if !qemu_available() {
        return;
    }
    let name = "qemu_mapped_ram_over_tcp";
    let ctx = TestCtx::new(name, BUDGET);
    let p = Params::new(2, "none", "multifd");
    let img = ctx.path("src.ram");
    gen_image(&ctx, &img, SLICE_MIB, 10);
    let mut src = Qemu::start(&ctx, QemuConfig::new("qemu-src", "none", SLICE_MIB, &img));
    src.set_multifd_caps(&p, &["mapped-ram"]);
    let dst = ctx.path("dst.ram");
    let (mut recv, port) = start_receiver(&ctx, &p, &dst, None, &["--handshake-timeout", "3"]);
    match src.try_cmd("migrate", json!({"uri": listen_uri(port)})) {
        Err(QmpError::Command { desc, .. }) => {
            eprintln!("[{name}] QEMU refuses mapped-ram over tcp: {desc}");
            assert!(
                desc.contains("mapped-ram") || desc.to_lowercase().contains("file"),
                "{desc}"
            );
            // Nothing connected; our receiver is still waiting: end it.
            assert!(
                !recv.exited(),
                "receiver exited without a source\n{}",
                recv.output_tail()
            );
        }
        Ok(_) => {
            let end = src.wait_migration(Duration::from_secs(30));
            let (st, killed) = recv.wait_or_kill(Duration::from_secs(30));
            eprintln!("[{name}] QEMU accepted mapped-ram over tcp: source {end:?}, receiver {st}");
            assert!(!killed, "receiver hangs\n{}", recv.output_tail());
            assert!(
                !st.success() || compare_files(&img, &dst, &[]).is_ok(),
                "receiver reported success with wrong RAM\n{}",
                recv.output_tail()
            );
        }
        Err(e) => panic!("[{name}] migrate: {e}\n{}", src.log()),
    }
}

// ---------------------------------------------------------------------------
// Listening at once: a QEMU `migrate` issued right after `multifd receive`
// started, while its fresh RAM file is still being mapped (and zeroed).

/// When `migrate` is issued after the receiver's process was started.
const MIGRATE_AFTER: Duration = Duration::from_millis(200);

/// How the destination's fresh `--ram` file is made, just before the
/// receiver starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FreshRam {
    /// `truncate -s SIZE`: sparse, reads as zeros.
    Truncated,
    /// The image generator with another seed: old data everywhere.
    Generated,
}

/// QEMU source with an `mib` MiB image; for each `(fresh, prefault)` case a
/// new QEMU source, a fresh destination file, and `multifd receive` on a
/// port picked in advance, given `migrate` [`MIGRATE_AFTER`] after the
/// receiver's process started, without waiting for any line from it. Each
/// migration must complete and leave the destination byte-identical.
fn migrate_right_after_start(name: &str, mib: u64, cases: &[(FreshRam, bool)], budget: Duration) {
    let ctx = TestCtx::new(name, budget);
    let p = Params::new(4, "none", "multifd");
    let img = ctx.path("src.ram");
    gen_image(&ctx, &img, mib, 21);
    for (i, &(fresh, prefault)) in cases.iter().enumerate() {
        let label = format!(
            "{mib} MiB {fresh:?}{}",
            if prefault { " --prefault" } else { "" }
        );
        let mut src = Qemu::start(
            &ctx,
            QemuConfig::new(&format!("qemu-src{i}"), "none", mib, &img),
        );
        src.set_multifd(&p);
        let dst = ctx.path(&format!("dst{i}.ram"));
        match fresh {
            FreshRam::Truncated => std::fs::File::create(&dst)
                .and_then(|f| f.set_len(mib * common::MIB))
                .unwrap_or_else(|e| panic!("creating {}: {e}", dst.display())),
            FreshRam::Generated => gen_image(&ctx, &dst, mib, 77),
        }
        let port = common::free_port();
        let mut args: Vec<String> = vec![
            "receive".into(),
            "--listen".into(),
            listen_uri(port),
            "--ram".into(),
            format!("m0={}", dst.display()),
            "--accept-timeout".into(),
            "60".into(),
            "--quiet".into(),
        ];
        args.extend(p.cli_args());
        if prefault {
            args.push("--prefault".into());
        }
        let t0 = Instant::now();
        let mut recv = ctx.multifd(&format!("receive{i}"), &args);
        std::thread::sleep(MIGRATE_AFTER.saturating_sub(t0.elapsed()));
        let issued = t0.elapsed();
        src.migrate(port);
        let end = src.wait_migration(ctx.remaining());
        let completed = t0.elapsed();
        if end != MigEnd::Completed {
            recv.wait_or_kill(Duration::from_secs(1));
            panic!(
                "[{name}] {label}: `migrate` issued {:.3} s after the receiver started: {end:?}\n{}\n{}",
                issued.as_secs_f64(),
                src.log(),
                recv.output_tail()
            );
        }
        expect_success(&ctx, &mut recv, Some(&src));
        let exited = t0.elapsed();
        if let Err(e) = compare_files(&img, &dst, &[]) {
            panic!("[{name}] {label}: {e}");
        }
        let ready = recv
            .stderr_text()
            .lines()
            .find_map(|l| l.strip_prefix("multifd: RAM ready ").map(str::to_owned))
            .unwrap_or_default();
        eprintln!(
            "[{name}] {label}: migrate at {:.3} s, QEMU completed at {:.3} s, receiver exited \
             at {:.3} s (RAM ready {ready}), identical",
            issued.as_secs_f64(),
            completed.as_secs_f64(),
            exited.as_secs_f64()
        );
        drop(src);
        std::fs::remove_file(&dst).ok();
    }
}

#[test]
fn qemu_migrates_right_after_receiver_starts() {
    if !qemu_available() {
        return;
    }
    migrate_right_after_start(
        "qemu_migrates_right_after_receiver_starts",
        1024,
        &[(FreshRam::Truncated, false), (FreshRam::Generated, true)],
        BUDGET,
    );
}

/// The same with 4 GiB, every way (too slow for the default suite with a
/// debug build on 2 cores; `MULTIFD_BIN=target/release/multifd` for figures).
#[test]
#[ignore = "slow: 4 GiB guest, four migrations"]
fn qemu_migrates_right_after_receiver_starts_4g() {
    if !qemu_available() {
        return;
    }
    migrate_right_after_start(
        "qemu_migrates_right_after_receiver_starts_4g",
        4096,
        &[
            (FreshRam::Truncated, false),
            (FreshRam::Truncated, true),
            (FreshRam::Generated, false),
            (FreshRam::Generated, true),
        ],
        Duration::from_secs(600),
    );
}

// ---------------------------------------------------------------------------
// The full matrix: 90 migrations of a 32 MiB guest whose first half is the
// generated page mix and whose second half is zero (zero-only packets):
//   cargo test -p multifd-cli --test qemu_interop -- --ignored full_matrix --nocapture

#[test]
#[ignore = "slow: the full channels x compression x zero-page x direction matrix"]
fn full_matrix() {
    if !qemu_available() {
        return;
    }
    let t0 = Instant::now();
    let mut results = Vec::new();
    for channels in [1u8, 2, 4, 8, 16] {
        for compression in ["none", "zlib", "zstd"] {
            for zero_page in ["multifd", "legacy", "none"] {
                let p = Params::new(channels, compression, zero_page);
                for dir in ["qemu_to_us", "us_to_qemu"] {
                    let name = format!("{dir}-{}", p.label());
                    let t = Instant::now();
                    let r = std::panic::catch_unwind(|| {
                        if dir == "qemu_to_us" {
                            qemu_to_us_with(&name, p, "none", MATRIX_MIB, |ctx, img| {
                                half_zero_image(ctx, img, MATRIX_MIB);
                            });
                        } else {
                            us_to_qemu_with(&name, p, MATRIX_MIB, |ctx, img| {
                                half_zero_image(ctx, img, MATRIX_MIB);
                            });
                        }
                    });
                    results.push((name, r.is_ok(), t.elapsed()));
                }
            }
        }
    }
    let passed = results.iter().filter(|r| r.1).count();
    let failed: Vec<&String> = results.iter().filter(|r| !r.1).map(|r| &r.0).collect();
    let slowest = results.iter().max_by_key(|r| r.2).expect("cases");
    eprintln!(
        "full_matrix: {passed}/{} passed in {:.1} s (accel {}, slowest {} {:.2} s)",
        results.len(),
        t0.elapsed().as_secs_f64(),
        common::accel(),
        slowest.0,
        slowest.2.as_secs_f64()
    );
    assert!(failed.is_empty(), "failed cases: {failed:?}");
}

// ---------------------------------------------------------------------------
// A flood of strangers during a real migration:
//   cargo test -p multifd-cli --test qemu_interop -- --ignored flood --nocapture

/// Open descriptors of process `pid`.
fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// While a QEMU source migrates a 1 GiB guest into `multifd receive`, a
/// client opens and drops 10,000 connections to the same port (garbage,
/// half handshakes, silence, immediate closes): the migration completes
/// byte-identical and the receiver's descriptors stay bounded.
#[test]
#[ignore = "slow: 1 GiB guest throttled to last through 10,000 connections"]
fn qemu_migration_survives_a_connection_flood() {
    if !qemu_available() {
        return;
    }
    let name = "qemu_migration_survives_a_connection_flood";
    let ctx = TestCtx::new(name, Duration::from_secs(300));
    let mib = 1024;
    let img = ctx.path("src.ram");
    gen_image(&ctx, &img, mib, 7);
    // zlib keeps pages moving through much of the flood (QEMU's
    // compressor is slow; its max-bandwidth does not hold back multifd
    // channels), and pause-before-switchover keeps the migration open to
    // its end: the source stops before its last section until told to go.
    let p = Params::new(4, "zlib", "multifd");
    let mut src = Qemu::start(&ctx, QemuConfig::new("qemu-src", "none", mib, &img));
    src.set_multifd_caps(&p, &["pause-before-switchover"]);
    let dst = ctx.path("dst.ram");
    let (mut recv, port) = start_receiver(&ctx, &p, &dst, None, &[]);
    let baseline = fd_count(recv.pid());
    src.migrate(port);
    // Every channel of the source is connected well before this.
    std::thread::sleep(Duration::from_millis(1500));
    let connected = fd_count(recv.pid());
    let t0 = Instant::now();
    let pid = recv.pid();
    // Four clients at once, 2,500 connections each; one of them samples
    // the receiver's descriptors as it goes.
    let (peak, refused) = std::thread::scope(|s| {
        let clients: Vec<_> = (0..4u32)
            .map(|c| {
                s.spawn(move || {
                    use std::io::Write;
                    let (mut peak, mut refused, mut held) = (0, 0, Vec::new());
                    for i in 0..2_500u32 {
                        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
                            refused += 1;
                            continue;
                        };
                        match i % 5 {
                            0 => drop(s.write_all(b"GET / HTTP/1.0\r\n\r\n")),
                            // Half of the multifd magic, then gone.
                            1 => drop(s.write_all(&[0x11, 0x22])),
                            // Half of the main stream's magic.
                            2 => drop(s.write_all(b"QE")),
                            // Silence, held for a while (8 at once per client).
                            3 => {
                                held.push(s);
                                if held.len() > 8 {
                                    held.remove(0);
                                }
                                continue;
                            }
                            _ => {}
                        }
                        drop(s);
                        if c == 0 && i % 50 == 0 {
                            peak = fd_count(pid).max(peak);
                        }
                    }
                    (peak, refused)
                })
            })
            .collect();
        clients
            .into_iter()
            .map(|h| h.join().expect("flood client"))
            .fold((connected, 0), |(p, r), (cp, cr)| (p.max(cp), r + cr))
    });
    let flood = t0.elapsed();
    eprintln!(
        "[{name}] 10000 connections in {:.1} s ({refused} refused) during the migration; \
         receiver fds: {baseline} before, {connected} with the migration's, peak {peak}",
        flood.as_secs_f64()
    );
    let still_running = recv.try_wait().is_none();
    // Let the source finish once it waits before switchover.
    let waiting = Instant::now();
    loop {
        let status = src.cmd("query-migrate", json!({}))["status"].clone();
        if status == "pre-switchover" {
            break;
        }
        assert!(
            waiting.elapsed() < ctx.remaining(),
            "[{name}] the source never reached pre-switchover: {status}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    src.cmd("migrate-continue", json!({"state": "pre-switchover"}));
    let end = src.wait_migration(ctx.remaining());
    assert_eq!(
        end,
        MigEnd::Completed,
        "[{name}] {}\n{}",
        src.log(),
        recv.output_tail()
    );
    expect_success(&ctx, &mut recv, Some(&src));
    assert!(
        still_running,
        "[{name}] the migration ended before the flood did"
    );
    assert!(
        refused < 100,
        "[{name}] {refused} connections refused: the port was not open"
    );
    if let Err(e) = compare_files(&img, &dst, &[]) {
        panic!("[{name}] {e}");
    }
    // The migration's own (5 connections, their handles, RAM, pipes) plus at
    // most 64 strangers held at once.
    assert!(
        peak <= connected + 64 + 8,
        "[{name}] descriptors grew to {peak}"
    );
}
