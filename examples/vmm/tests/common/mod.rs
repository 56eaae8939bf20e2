//! Shared helpers of the VMM tests: the KVM/nasm gate, assembling the
//! guest, reading and checking its counters.
#![allow(dead_code, missing_docs)]

pub mod checker;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use checker::{CounterState, check_counters};
use multifd_example_vmm::{Vm, VmConfig};

pub const PAGE: u64 = 4096;
pub const MIB: u64 = 1 << 20;
/// The range the guest increments (passed to nasm, checked here): 32 MiB,
/// 8192 pages, as in the QEMU live tests.
pub const START: u64 = 16 * MIB;
pub const END: u64 = 48 * MIB;
/// Generous bound for anything the guest is waited for.
pub const WAIT: Duration = Duration::from_secs(30);

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// True when the tests can run. Without /dev/kvm or nasm: a loud SKIPPED,
/// or a failure when `CI` is set (CI has both).
pub fn can_run() -> bool {
    let missing = if !Path::new("/dev/kvm").exists() {
        Some("/dev/kvm")
    } else if Command::new("nasm").arg("-v").output().is_err() {
        Some("nasm")
    } else {
        None
    };
    match missing {
        None => true,
        Some(what) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "{what} is missing and CI is set: the KVM tests must run"
            );
            eprintln!("\n*** SKIPPED: {what} not available, KVM guest test not run ***\n");
            false
        }
    }
}

/// Assembles guest/loop.asm for [START, END) into a temp dir.
pub fn boot_sector() -> Vec<u8> {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("boot.img");
    let st = Command::new("nasm")
        .args([
            "-f",
            "bin",
            &format!("-DSTART={START:#x}"),
            &format!("-DEND={END:#x}"),
            "-o",
        ])
        .arg(&out)
        .arg(repo_root().join("guest/loop.asm"))
        .status()
        .expect("running nasm");
    assert!(st.success(), "nasm failed: {st}");
    let img = std::fs::read(&out).expect("boot.img");
    assert_eq!(img.len(), 512, "the boot sector must be 512 bytes");
    img
}

/// The counter pages of a (paused) VM.
pub fn counters(vm: &Vm) -> CounterState {
    let mut mem = vec![0u8; (END - START) as usize];
    vm.read_memory(START, &mut mem).expect("reading guest RAM");
    check_counters(&mem, START).unwrap_or_else(|e| panic!("guest RAM: {e}"))
}

/// Checks that a paused guest's RAM agrees with its marker count: after M
/// markers every counter is M (mod 256) with a prefix of the pass in
/// progress one ahead, or all are M + 1 when the pass ended but its marker
/// was not written yet.
pub fn check_consistent(vm: &Vm) -> CounterState {
    let s = counters(vm);
    let m = vm.markers();
    let ok = s.value == m as u8 || (s.value == (m + 1) as u8 && s.advanced == 0);
    assert!(ok, "counters {s:?} do not match {m} markers");
    s
}

pub fn config() -> VmConfig {
    VmConfig::default()
}
pub mod live;
