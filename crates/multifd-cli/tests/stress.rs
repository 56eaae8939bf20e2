//! `multifd stress`, scaled down for CI: every scenario a few times through
//! the binary (real loopback sockets, real TLS, the fault proxy), which
//! exits non-zero on any failed run or leaked thread or descriptor. The
//! full acceptance runs (thousands of runs) are in the README.

use std::process::Command;
use std::time::{Duration, Instant};

fn stress(args: &[&str]) {
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_multifd"))
        .arg("stress")
        .args(args)
        .args(["--seed", "7", "--json"])
        .output()
        .expect("running multifd stress");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "multifd stress {args:?} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON summary");
    assert_eq!(v["failed"], 0, "{v}");
    assert!(v["leaks"].as_array().is_some_and(Vec::is_empty), "{v}");
    assert!(v["runs"].as_u64().unwrap_or(0) > 0, "{v}");
    eprintln!(
        "multifd stress {args:?}: {} runs in {:?}",
        v["runs"],
        started.elapsed()
    );
    assert!(started.elapsed() < Duration::from_secs(120));
}

#[test]
fn reject_anon_client() {
    stress(&[
        "--scenario",
        "reject-anon-client",
        "--runs",
        "40",
        "--check-every",
        "10",
    ]);
}

#[test]
fn every_fault_point_with_and_without_tls() {
    stress(&[
        "--scenario",
        "faults",
        "--runs",
        "2",
        "--tls",
        "both",
        "--check-every",
        "10",
    ]);
}

#[test]
fn clean_runs_with_4_and_8_channels() {
    stress(&[
        "--scenario",
        "clean",
        "--runs",
        "2",
        "--channels",
        "4,8",
        "--tls",
        "both",
        "--ram-mib",
        "2",
    ]);
}
