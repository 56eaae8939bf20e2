//! The `multifd` binary's surface without QEMU: option validation (usage
//! errors, exit status 2, one line), the one-line failure report with its
//! hints, whom it trusts (plain TCP beyond loopback needs --insecure), and a receiver that listens before its RAM is
//! ready. Sources are faked with the wire crate's encoders where a test
//! needs one that stops at a chosen point.
//!
//! ```text
//! cargo test -p multifd-cli --test cli
//! ```

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{Proc, TestCtx, start_receiver};
use multifd_wire::packet::InitPacket;
use multifd_wire::stream::{Configuration, RamBlockInfo, encode};

const BUDGET: Duration = Duration::from_secs(60);

/// Waits (bounded) for `p` to exit; returns its status code and stderr.
fn finish(p: &mut Proc, timeout: Duration) -> (Option<i32>, String) {
    let (st, killed) = p.wait_or_kill(timeout);
    assert!(
        !killed,
        "{} did not exit within {timeout:?}\n{}",
        p.name,
        p.output_tail()
    );
    (st.code(), p.stderr_text())
}

/// Asserts that `stderr` is exactly one line, `multifd: error: ...`.
fn assert_one_error_line(stderr: &str, what: &str) {
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{what}: not one line:\n{stderr}");
    assert!(lines[0].starts_with("multifd: error: "), "{what}: {stderr}");
    assert!(!stderr.contains("panicked"), "{what}: {stderr}");
}

#[test]
fn bad_values_are_usage_errors() {
    let ctx = TestCtx::new("bad_values_are_usage_errors", BUDGET);
    let ram = format!("m0={}", ctx.path("dst.ram").display());
    let receive = ["receive", "--listen", "tcp:127.0.0.1:0", "--ram", &ram];
    let send = ["send", "--to", "tcp:127.0.0.1:9", "--ram", &ram];
    let cases: &[(&[&str], &[&str])] = &[
        (&receive, &["--idle-timeout", "-1"]),
        (&receive, &["--idle-timeout", "-0.5"]),
        (&receive, &["--idle-timeout", "NaN"]),
        (&receive, &["--idle-timeout", "inf"]),
        (&receive, &["--idle-timeout", "-inf"]),
        (&receive, &["--idle-timeout", "1e400"]),
        (&receive, &["--idle-timeout", "1e12"]),
        (&receive, &["--idle-timeout", "18446744073709551616"]),
        (&receive, &["--idle-timeout", "0.0000001"]),
        (&receive, &["--idle-timeout", "ten"]),
        (&receive, &["--idle-timeout", ""]),
        (&receive, &["--handshake-timeout", "0"]),
        (&receive, &["--handshake-timeout", "-5"]),
        (&receive, &["--handshake-timeout", "NaN"]),
        (&receive, &["--accept-timeout", "0"]),
        (&receive, &["--accept-timeout", "inf"]),
        (&receive, &["--max-ram", "0"]),
        (&receive, &["--max-ram", "-1GiB"]),
        (&receive, &["--max-ram", "2EiB"]),
        (&receive, &["--max-ram", "99999999999999999999999999999GiB"]),
        (&receive, &["--max-ram", "lots"]),
        (&receive, &["--max-ram", "4 XiB"]),
        (&receive, &["--channels", "0"]),
        (&receive, &["--channels", "256"]),
        (&receive, &["--channels", "-1"]),
        (&receive, &["--zlib-level", "10"]),
        (&receive, &["--zstd-level", "-1"]),
        (&receive, &["--zstd-level", "21"]),
        (
            &receive,
            &["--uuid", "0\u{e9}345678-9abc-def0-1122-33445566778"],
        ),
        (
            &receive,
            &["--uuid", "12345678-9abc-def0-1122-33445566\u{20ac}7"],
        ),
        (&receive, &["--uuid", "\u{1F600}"]),
        (
            &receive,
            &["--uuid", "1234567-89abc-def0-1122-334455667788"],
        ),
        (
            &receive,
            &["--uuid", "+2345678-9abc-def0-1122-334455667788"],
        ),
        (
            &receive,
            &["--uuid", "-2345678-9abc-def0-1122-334455667788"],
        ),
        (&receive, &["--uuid", "not-a-uuid"]),
        (&send, &["--idle-timeout", "-1"]),
        (&send, &["--idle-timeout", "NaN"]),
        (&send, &["--connect-timeout", "0"]),
        (&send, &["--connect-timeout", "-1"]),
        (&send, &["--connect-timeout", "inf"]),
        (&send, &["--connect-timeout", "1e30"]),
        (&send, &["--handshake-timeout", "0"]),
        (&send, &["--uuid", "\u{e9}\u{e9}"]),
        (&["gen-image", "/nonexistent/x"], &["--size", "1000"]),
        (&["gen-image", "/nonexistent/x"], &["--size", "0"]),
        (&["gen-image", "/nonexistent/x"], &["--size", "-1GiB"]),
        (&["bench"], &["--runs", "0"]),
        (&["bench"], &["--channels", "0"]),
        (&["bench"], &["--size", "1.5"]),
        (&["demo"], &["--channels", "0"]),
    ];
    for (i, (base, bad)) in cases.iter().enumerate() {
        let args: Vec<&str> = base.iter().chain(bad.iter()).copied().collect();
        let mut p = ctx.multifd(&format!("case{i}"), &args);
        let (code, stderr) = finish(&mut p, Duration::from_secs(10));
        let what = format!("{bad:?}");
        assert_eq!(code, Some(2), "{what}: exit status {code:?}\n{stderr}");
        assert_one_error_line(&stderr, &what);
        assert!(
            stderr.contains(bad[0]),
            "{what}: the message does not name the option: {stderr}"
        );
        assert!(p.stdout_text().is_empty(), "{what}: wrote to stdout");
    }
}

#[test]
fn help_and_version_succeed() {
    let ctx = TestCtx::new("help_and_version_succeed", BUDGET);
    for args in [&["--help"][..], &["--version"], &["receive", "--help"]] {
        let mut p = ctx.multifd("help", args);
        let (code, _) = finish(&mut p, Duration::from_secs(10));
        assert_eq!(code, Some(0), "{args:?}");
    }
    let help = {
        let mut p = ctx.multifd("help", &["receive", "--help"]);
        finish(&mut p, Duration::from_secs(10));
        p.stdout_text()
    };
    for flag in [
        "--idle-timeout",
        "--max-ram",
        "--handshake-timeout",
        "--prefault",
    ] {
        assert!(help.contains(flag), "receive --help lacks {flag}");
    }
}

// ---------------------------------------------------------------------------
// Failures from a source that stops where the test wants: one line each,
// with the flag that changes the outcome.

/// The `ram` section id of the faked stream.
const RAM_SECTION: u32 = 1;

/// Connects as a source: the main stream up to the end of the `ram` START
/// section (header, configuration, the block list, a FLUSH), and `channels`
/// initial packets. The connections stay open (and silent) until dropped.
fn fake_source(port: u16, blocks: &[(&str, u64)], channels: u8) -> Vec<TcpStream> {
    let mut setup = Vec::new();
    encode::header(&mut setup);
    let cfg = Configuration {
        machine: "none".into(),
        ..Configuration::default()
    };
    encode::configuration(&mut setup, &cfg).expect("configuration");
    encode::section_start(&mut setup, RAM_SECTION, "ram", 0, 4).expect("section start");
    let infos: Vec<RamBlockInfo> = blocks
        .iter()
        .map(|&(name, len)| RamBlockInfo {
            idstr: name.into(),
            used_length: len,
        })
        .collect();
    encode::mem_size(&mut setup, &infos).expect("block list");
    encode::flush(&mut setup);
    encode::eos(&mut setup);
    encode::section_footer(&mut setup, RAM_SECTION);
    let connect = || TcpStream::connect(("127.0.0.1", port)).expect("connecting to the receiver");
    let mut conns = Vec::new();
    let mut main = connect();
    main.write_all(&setup).expect("writing the main stream");
    conns.push(main);
    for id in 0..channels {
        let mut c = connect();
        c.write_all(&InitPacket { uuid: [0; 16], id }.encode())
            .expect("writing an initial packet");
        conns.push(c);
    }
    conns
}

/// Starts a receiver with `args`, lets a fake source with `blocks` connect,
/// and returns the receiver's one error line (it must fail within 20 s).
fn receive_from_fake(name: &str, blocks: &[(&str, u64)], args: &[&str]) -> String {
    let ctx = TestCtx::new(name, BUDGET);
    let ram = format!("m0={}", ctx.path("dst.ram").display());
    let mut all = vec!["--ram", &ram, "--channels", "2", "--quiet"];
    all.extend_from_slice(args);
    let (mut recv, port) = start_receiver(&ctx, "receive", &all);
    let _conns = fake_source(port, blocks, 2);
    let (code, stderr) = finish(&mut recv, Duration::from_secs(20));
    assert_eq!(code, Some(1), "{name}: exit status\n{stderr}");
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("multifd: error"))
        .collect();
    assert_eq!(errors.len(), 1, "{name}: {stderr}");
    assert_one_error_line(errors[0], name);
    eprintln!("[{name}] {}", errors[0]);
    errors[0].to_owned()
}

#[test]
fn ram_limit_names_max_ram() {
    let line = receive_from_fake(
        "ram_limit_names_max_ram",
        &[("m0", 64 << 30)],
        &["--max-ram", "1MiB"],
    );
    assert!(line.contains("more than the limit of 1048576"), "{line}");
    assert!(
        line.ends_with("(hint: --max-ram SIZE raises the limit)"),
        "{line}"
    );
}

#[test]
fn unplaced_block_names_ram_and_snapshot() {
    let line = receive_from_fake(
        "unplaced_block_names_ram_and_snapshot",
        &[("m0", 1 << 20), ("pc.bios", 256 << 10)],
        &[],
    );
    assert!(line.contains("unknown RAM block \"pc.bios\""), "{line}");
    assert!(line.contains("--ram pc.bios=FILE"), "{line}");
    assert!(line.contains("--snapshot DIR"), "{line}");
}

#[test]
fn stalled_source_names_idle_timeout() {
    let t0 = Instant::now();
    let line = receive_from_fake(
        "stalled_source_names_idle_timeout",
        &[("m0", 1 << 20)],
        &["--idle-timeout", "1"],
    );
    assert!(line.contains("stalled"), "{line}");
    assert!(line.contains("(hint: --idle-timeout SECS"), "{line}");
    assert!(t0.elapsed() < Duration::from_secs(15), "{:?}", t0.elapsed());
}

/// A receive into a snapshot directory that fails after the block files
/// were made (the source stalls) removes them again: the same directory
/// takes the next attempt, which fails for its own reason (the stall
/// again), not because the directory holds files.
#[test]
fn failed_receive_leaves_the_snapshot_dir_reusable() {
    let ctx = TestCtx::new("failed_receive_leaves_the_snapshot_dir_reusable", BUDGET);
    let ram = format!("m0={}", ctx.path("dst.ram").display());
    let snap = ctx.path("snap");
    let snap_arg = snap.display().to_string();
    let blocks = [("m0", 1 << 20), ("pc.bios", 256 << 10)];
    for attempt in 1..=2 {
        let args = [
            "--ram",
            &ram,
            "--snapshot",
            &snap_arg,
            "--channels",
            "2",
            "--quiet",
            "--idle-timeout",
            "1",
        ];
        let (mut recv, port) = start_receiver(&ctx, "receive", &args);
        let _conns = fake_source(port, &blocks, 2);
        let (code, stderr) = finish(&mut recv, Duration::from_secs(20));
        assert_eq!(code, Some(1), "attempt {attempt}: exit status\n{stderr}");
        assert!(stderr.contains("stalled"), "attempt {attempt}: {stderr}");
        let left: Vec<_> = std::fs::read_dir(snap.join("ram"))
            .expect("the ram directory was made")
            .collect();
        assert!(left.is_empty(), "attempt {attempt}: {left:?}");
    }
}

#[test]
fn silent_connection_names_handshake_timeout() {
    let ctx = TestCtx::new("silent_connection_names_handshake_timeout", BUDGET);
    let ram = format!("m0={}", ctx.path("dst.ram").display());
    let (mut recv, port) = start_receiver(
        &ctx,
        "receive",
        &["--ram", &ram, "--handshake-timeout", "0.5", "--quiet"],
    );
    let _silent = TcpStream::connect(("127.0.0.1", port)).expect("connecting");
    let (code, stderr) = finish(&mut recv, Duration::from_secs(20));
    assert_eq!(code, Some(1), "{stderr}");
    let line = stderr.lines().last().unwrap_or_default();
    assert_one_error_line(line, "silent connection");
    assert!(line.contains("no handshake within 500 ms"), "{line}");
    assert!(line.contains("(hint: --handshake-timeout SECS"), "{line}");
}

// ---------------------------------------------------------------------------
// Listening at once; whom we trust.

#[test]
fn listens_before_ram_is_ready() {
    let ctx = TestCtx::new("listens_before_ram_is_ready", BUDGET);
    let dst = ctx.path("dst.ram");
    std::fs::File::create(&dst)
        .and_then(|f| f.set_len(1 << 30))
        .expect("creating a fresh 1 GiB RAM file");
    let ram = format!("m0={}", dst.display());
    let t0 = Instant::now();
    let (mut recv, port) = start_receiver(&ctx, "receive", &["--ram", &ram, "--prefault"]);
    let listening = t0.elapsed();
    // The port takes connections at once (a probe would be taken for a
    // migration channel: look at the kernel's table instead).
    assert!(common::tcp_listening(port));
    let ready = common::poll(Duration::from_secs(30), Duration::from_millis(5), || {
        recv.stderr_text()
            .contains("multifd: RAM ready")
            .then(Instant::now)
    })
    .unwrap_or_else(|| panic!("RAM never ready\n{}", recv.output_tail()));
    let stderr = recv.stderr_text();
    let at = |s: &str| stderr.find(s).expect(s);
    assert!(
        at("multifd: listening on") < at("multifd: RAM ready"),
        "{stderr}"
    );
    eprintln!(
        "[listens_before_ram_is_ready] listening after {:.3} s, RAM ready after {:.3} s",
        listening.as_secs_f64(),
        (ready - t0).as_secs_f64()
    );
    assert!(listening < Duration::from_secs(2), "{listening:?}");
    recv.kill();
}

#[test]
fn ram_preparation_failure_is_one_line() {
    let ctx = TestCtx::new("ram_preparation_failure_is_one_line", BUDGET);
    // A directory where a RAM file should be: opening it for writing fails.
    let dir = ctx.path("not-a-file");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("x"), b"x").unwrap();
    let ram = format!("m0={}", dir.display());
    let (mut recv, _port) = start_receiver(&ctx, "receive", &["--ram", &ram]);
    let (code, stderr) = finish(&mut recv, Duration::from_secs(20));
    assert_eq!(code, Some(1), "{stderr}");
    let line = stderr.lines().last().unwrap_or_default();
    assert_one_error_line(line, "bad RAM file");
    assert!(line.contains("preparing destination RAM"), "{line}");
}

/// The trust warning of a receiver listening where `listen` says (given
/// the test's context), if any, with `extra` flags. It is given no source:
/// it stops after its accept timeout.
fn receiver_warning(
    name: &str,
    listen: impl FnOnce(&TestCtx) -> String,
    extra: &[&str],
) -> Option<String> {
    let ctx = TestCtx::new(name, BUDGET);
    let listen = listen(&ctx);
    let ram = format!("m0={}", ctx.path("dst.ram").display());
    let mut args = vec![
        "receive",
        "--listen",
        &listen,
        "--ram",
        &ram,
        "--accept-timeout",
        "0.3",
    ];
    args.extend(extra);
    let mut p = ctx.multifd("receive", &args);
    let (code, stderr) = finish(&mut p, Duration::from_secs(20));
    assert_eq!(code, Some(1), "{name}: {stderr}");
    stderr
        .lines()
        .find(|l| l.starts_with("multifd: warning"))
        .map(str::to_owned)
}

#[test]
fn receiver_beyond_loopback_needs_insecure() {
    let ctx = TestCtx::new("receiver_beyond_loopback_needs_insecure", BUDGET);
    let ram = format!("m0={}", ctx.path("dst.ram").display());
    let mut p = ctx.multifd(
        "receive",
        &["receive", "--listen", "tcp:0.0.0.0:0", "--ram", &ram],
    );
    let (code, stderr) = finish(&mut p, Duration::from_secs(20));
    // Refused like a bad flag, before it says it listens.
    assert_eq!(code, Some(2), "{stderr}");
    assert_one_error_line(&stderr, "plain TCP beyond loopback");
    for words in [
        "without TLS",
        "anyone who can reach this port",
        "supply the guest memory",
        "(hint: --tls-creds DIR or --tls-psk DIR",
        "--insecure",
    ] {
        assert!(stderr.contains(words), "no {words:?}: {stderr}");
    }
    let w = receiver_warning(
        "receiver_beyond_loopback_insecure_warns",
        |_| "tcp:0.0.0.0:0".into(),
        &["--insecure"],
    )
    .expect("no warning for a receiver on 0.0.0.0 with --insecure");
    assert!(w.contains("without TLS"), "{w}");
    assert!(w.contains("anyone who can reach this port"), "{w}");
    assert!(w.contains("supply the guest memory"), "{w}");
}

#[test]
fn receiver_on_loopback_or_unix_does_not_warn() {
    for listen in ["tcp:127.0.0.1:0", "tcp:localhost:0", "unix"] {
        let warning = receiver_warning(
            "receiver_on_loopback_or_unix",
            |ctx| {
                if listen == "unix" {
                    format!("unix:{}", ctx.path("mig.sock").display())
                } else {
                    listen.into()
                }
            },
            &[],
        );
        assert_eq!(warning, None, "{listen}");
    }
}

#[test]
fn sender_beyond_loopback_needs_insecure() {
    let ctx = TestCtx::new("sender_beyond_loopback_needs_insecure", BUDGET);
    let img = ctx.path("src.ram");
    std::fs::write(&img, vec![0u8; 4096]).unwrap();
    let ram = format!("m0={}", img.display());
    // TEST-NET-1: nobody answers there (or the network is unreachable).
    let args = [
        "send",
        "--to",
        "tcp:192.0.2.1:4444",
        "--ram",
        &ram,
        "--connect-timeout",
        "0.5",
        "--quiet",
    ];
    let mut p = ctx.multifd("send", &args);
    let (code, stderr) = finish(&mut p, Duration::from_secs(20));
    assert_eq!(code, Some(2), "{stderr}");
    assert_one_error_line(&stderr, "plain TCP beyond loopback");
    assert!(stderr.contains("read it"), "{stderr}");
    assert!(stderr.contains("--insecure"), "{stderr}");
    let mut args = args.to_vec();
    args.push("--insecure");
    let mut p = ctx.multifd("send-insecure", &args);
    let (code, stderr) = finish(&mut p, Duration::from_secs(20));
    assert_eq!(code, Some(1), "{stderr}");
    let warning = stderr
        .lines()
        .find(|l| l.starts_with("multifd: warning"))
        .unwrap_or_else(|| panic!("no warning: {stderr}"));
    assert!(warning.contains("read it"), "{warning}");
    let error = stderr.lines().last().unwrap_or_default();
    assert_one_error_line(error, "unreachable destination");
    if error.contains("no answer within") {
        assert!(error.contains("(hint: --connect-timeout SECS"), "{error}");
    }
}
