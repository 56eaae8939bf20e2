//! `multifd send` → `multifd receive` over loopback TCP and Unix sockets:
//! every channel count, every method and zero-page mode, snapshots, JSON
//! stats, and clean failures. RAM must arrive byte-identical.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_multifd");

/// A temp dir in /dev/shm (tmpfs, like guest RAM files), removed on drop.
fn shm_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("multifd-test-")
        .tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .expect("temp dir")
}

/// A child killed (by PID) and reaped if the test ends early.
struct Proc(Option<Child>);

impl Proc {
    fn spawn(args: &[&str]) -> Self {
        let child = Command::new(BIN)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn multifd");
        Self(Some(child))
    }

    /// Waits at most `limit`; panics (after killing) if it takes longer.
    fn finish(mut self, limit: Duration) -> Output {
        let mut child = self.0.take().expect("child");
        let deadline = Instant::now() + limit;
        while child.try_wait().expect("try_wait").is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let out = child.wait_with_output().expect("reap");
                panic!(
                    "multifd did not finish within {limit:?}; stderr: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        child.wait_with_output().expect("output")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn gen_image(path: &Path, size: &str) {
    let st = Command::new(BIN)
        .args(["gen-image", path.to_str().unwrap(), "--size", size])
        .status()
        .expect("gen-image");
    assert!(st.success());
}

fn free_tcp_uri() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    format!("tcp:127.0.0.1:{}", l.local_addr().unwrap().port())
}

fn same_file(a: &Path, b: &Path) -> bool {
    std::fs::read(a).unwrap() == std::fs::read(b).unwrap()
}

/// Runs receive + send with the same extra flags; returns both outputs.
fn migrate(
    uri: &str,
    src: &Path,
    dst_ram: &[String],
    recv_extra: &[&str],
    send_extra: &[&str],
) -> (Output, Output) {
    let mut rargs = vec![
        "receive",
        "--listen",
        uri,
        "--json",
        "--accept-timeout",
        "20",
    ];
    let ram_flags: Vec<String> = dst_ram
        .iter()
        .flat_map(|r| ["--ram".to_string(), r.clone()])
        .collect();
    rargs.extend(ram_flags.iter().map(String::as_str));
    rargs.extend_from_slice(recv_extra);
    let recv = Proc::spawn(&rargs);
    let src_arg = format!("m0={}", src.display());
    let mut sargs = vec!["send", "--to", uri, "--ram", &src_arg, "--json"];
    sargs.extend_from_slice(send_extra);
    let send = Proc::spawn(&sargs);
    let s = send.finish(Duration::from_secs(60));
    let r = recv.finish(Duration::from_secs(60));
    (s, r)
}

fn assert_ok(out: &Output, who: &str) {
    assert!(
        out.status.success(),
        "{who} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn every_channel_count_over_tcp_and_unix_is_byte_identical() {
    let dir = shm_dir();
    let src = dir.path().join("src.img");
    gen_image(&src, "24MiB");
    for transport in ["tcp", "unix"] {
        for ch in ["1", "2", "4", "8", "16"] {
            let uri = match transport {
                "tcp" => free_tcp_uri(),
                _ => format!("unix:{}", dir.path().join(format!("s{ch}.sock")).display()),
            };
            let dst = dir.path().join(format!("dst-{transport}-{ch}.img"));
            let (s, r) = migrate(
                &uri,
                &src,
                &[format!("m0={}", dst.display())],
                &["--channels", ch],
                &["--channels", ch],
            );
            assert_ok(&s, "sender");
            assert_ok(&r, "receiver");
            assert!(
                same_file(&src, &dst),
                "{transport} {ch} channels: RAM differs"
            );
            let stats: serde_json::Value =
                serde_json::from_slice(&r.stdout).expect("receiver JSON");
            assert_eq!(stats["channels"], ch.parse::<u64>().unwrap());
            assert_eq!(
                stats["normal_pages"].as_u64().unwrap() + stats["zero_pages"].as_u64().unwrap(),
                24 * 256,
                "every page arrives once"
            );
            std::fs::remove_file(&dst).unwrap();
        }
    }
}

#[test]
fn every_method_and_zero_page_mode_is_byte_identical() {
    let dir = shm_dir();
    let src = dir.path().join("src.img");
    gen_image(&src, "8MiB");
    for comp in ["none", "zlib", "zstd"] {
        for zero in ["multifd", "legacy", "none"] {
            for flush in [false, true] {
                let dst = dir.path().join("dst.img");
                // A destination file with stale data: zero pages must overwrite it.
                std::fs::write(&dst, vec![0xAAu8; 8 << 20]).unwrap();
                let mut flags = vec![
                    "--channels",
                    "3",
                    "--compression",
                    comp,
                    "--zero-page-detection",
                    zero,
                ];
                if flush {
                    flags.push("--flush-after-each-section");
                }
                let (s, r) = migrate(
                    &free_tcp_uri(),
                    &src,
                    &[format!("m0={}", dst.display())],
                    &flags,
                    &flags,
                );
                assert_ok(&s, "sender");
                assert_ok(&r, "receiver");
                assert!(
                    same_file(&src, &dst),
                    "{comp}/{zero}/flush={flush}: RAM differs"
                );
                let stats: serde_json::Value = serde_json::from_slice(&s.stdout).unwrap();
                let zeros = stats["zero_pages"].as_u64().unwrap();
                match zero {
                    "none" => assert_eq!(
                        zeros, 0,
                        "zero-page-detection=none sends zero pages as data"
                    ),
                    _ => assert!(zeros > 0, "{zero}: zero pages detected"),
                }
            }
        }
    }
}

#[test]
fn snapshot_stores_and_replays() {
    let dir = shm_dir();
    let src = dir.path().join("src.img");
    gen_image(&src, "8MiB");
    let snap = dir.path().join("snap");
    let uri = free_tcp_uri();
    let snap_s = snap.to_str().unwrap();
    let (s, r) = migrate(
        &uri,
        &src,
        &[],
        &["--snapshot", snap_s],
        &["--machine", "none"],
    );
    assert_ok(&s, "sender");
    assert_ok(&r, "receiver");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(snap.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["format"], 1);
    assert_eq!(manifest["machine"], "none");
    assert_eq!(manifest["ram_blocks"][0]["idstr"], "m0");
    assert_eq!(manifest["ram_blocks"][0]["length"], 8 << 20);
    assert_eq!(manifest["ram_blocks"][0]["page_size"], 4096);
    let block_file = snap.join(manifest["ram_blocks"][0]["file"].as_str().unwrap());
    assert!(same_file(&src, &block_file));

    // Replay the snapshot into a second receiver.
    let dst = dir.path().join("replayed.img");
    let uri2 = free_tcp_uri();
    let recv = Proc::spawn(&[
        "receive",
        "--listen",
        &uri2,
        "--ram",
        &format!("m0={}", dst.display()),
        "--accept-timeout",
        "20",
    ]);
    let send = Proc::spawn(&["send", "--to", &uri2, "--snapshot", snap_s]);
    assert_ok(&send.finish(Duration::from_secs(60)), "replaying sender");
    assert_ok(
        &recv.finish(Duration::from_secs(60)),
        "receiver of the replay",
    );
    assert!(same_file(&src, &dst));

    let inspect = Command::new(BIN)
        .args(["inspect", snap_s])
        .output()
        .unwrap();
    assert_ok(&inspect, "inspect");
    let text = String::from_utf8_lossy(&inspect.stdout);
    assert!(
        text.contains("machine: none") && text.contains("m0"),
        "{text}"
    );
}

fn one_line_error(out: &Output) -> String {
    assert!(!out.status.success(), "expected failure");
    // The receiver announces where it listens and when its RAM is ready;
    // the cause is what follows.
    let err: String = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| !l.starts_with("multifd: listening on") && !l.starts_with("multifd: RAM ready"))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(err.starts_with("multifd: error:"), "{err}");
    assert_eq!(err.lines().count(), 1, "one-line cause: {err}");
    err
}

#[test]
fn failures_exit_nonzero_with_a_one_line_cause() {
    let dir = shm_dir();
    let src = dir.path().join("src.img");
    gen_image(&src, "4MiB");
    let src_arg = format!("m0={}", src.display());

    // Nobody listening.
    let uri = free_tcp_uri();
    let out = Proc::spawn(&[
        "send",
        "--to",
        &uri,
        "--ram",
        &src_arg,
        "--connect-timeout",
        "0.3",
    ])
    .finish(Duration::from_secs(10));
    assert!(one_line_error(&out).contains("connecting"));

    // Channel counts differ: the receiver names the mismatch, both exit.
    let dst = dir.path().join("dst.img");
    let start = Instant::now();
    let (s, r) = migrate(
        &uri,
        &src,
        &[format!("m0={}", dst.display())],
        &["--channels", "2", "--handshake-timeout", "1"],
        &["--channels", "4"],
    );
    assert!(start.elapsed() < Duration::from_secs(10));
    let err = one_line_error(&r);
    assert!(err.contains("multifd-channels differs"), "{err}");
    assert!(!s.status.success() || !r.status.success());

    // Compression differs.
    let (_s, r) = migrate(
        &free_tcp_uri(),
        &src,
        &[format!("m0={}", dst.display())],
        &["--compression", "zlib"],
        &["--compression", "zstd"],
    );
    assert!(one_line_error(&r).contains("mismatch"));

    // A block the receiver was not told about and no snapshot dir.
    let (_s, r) = migrate(
        &free_tcp_uri(),
        &src,
        &[format!("other={}", dst.display())],
        &[],
        &[],
    );
    assert!(one_line_error(&r).contains("other"));

    // Bad URIs and bad --ram syntax.
    let out = Proc::spawn(&["send", "--to", "http://x", "--ram", &src_arg])
        .finish(Duration::from_secs(5));
    one_line_error(&out);
    let out = Proc::spawn(&["receive", "--listen", "tcp:127.0.0.1:1", "--ram", "nofile"])
        .finish(Duration::from_secs(5));
    one_line_error(&out);
}

#[test]
fn bench_command_runs_and_reports() {
    let dir = shm_dir();
    let out = Command::new(BIN)
        .args([
            "bench",
            "--size",
            "16MiB",
            "--channels",
            "2",
            "--runs",
            "1",
            "--json",
            "--dir",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_ok(&out, "bench");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["raw_median_s"].as_f64().unwrap() > 0.0);
    assert!(v["migration_median_s"].as_f64().unwrap() > 0.0);
    assert!(v["raw_read_all_median_s"].as_f64().unwrap() > 0.0);
    let ceiling = v["raw_read_all_vs_raw"].as_f64().unwrap();
    let expect = v["raw_median_s"].as_f64().unwrap() / v["raw_read_all_median_s"].as_f64().unwrap();
    assert!((ceiling - expect).abs() < 1e-9, "{ceiling} vs {expect}");
    assert!(v["recv_rss_overhead_peak_mib"].as_f64().is_some());
    let _ = PathBuf::new();
}
