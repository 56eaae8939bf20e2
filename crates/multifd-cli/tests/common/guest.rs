//! The booted test guest (`guest/loop.asm`) as the live-guest tests run
//! it: assembled at test time, q35, 128 MiB, counters in 16..48 MiB.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::qemu::{Qemu, QemuConfig};
use super::{MIB, TestCtx, accel, file_len, poll};

/// The range the guest increments.
pub const START: u64 = 16 * MIB;
/// End of that range.
pub const END: u64 = 48 * MIB;
/// Guest RAM.
pub const MEM_MIB: u64 = 128;
/// The page a KVM destination rewrites on load (kvmclock's pvclock area).
pub const KVM_REWRITTEN_PAGE: u64 = 0xe8000;

/// Assembles guest/loop.asm into a 1 MiB raw disk image.
pub fn assemble(ctx: &TestCtx) -> PathBuf {
    let src = super::repo_root().join("guest/loop.asm");
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
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&out)
        .expect("boot.img");
    f.set_len(MIB).expect("padding boot.img");
    out
}

/// The guest's command line (q35, RAM in `ram`, the boot disk, serial
/// port 0 into `serial`), started paused.
pub fn guest(name: &str, ram: &Path, boot: &Path, serial: &Path) -> QemuConfig {
    let mut c = QemuConfig::new(name, "q35", MEM_MIB, ram);
    c.extra = vec![
        "-drive".into(),
        format!("file={},format=raw,if=ide,file.locking=off", boot.display()),
        "-serial".into(),
        format!("file:{}", serial.display()),
    ];
    c
}

/// Waits until the serial file holds `n` markers; returns how many.
pub fn wait_markers(q: &mut Qemu, serial: &Path, n: u64, timeout: Duration) -> u64 {
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
pub fn volatile_pages() -> Vec<u64> {
    if accel() == "kvm" {
        vec![KVM_REWRITTEN_PAGE]
    } else {
        Vec::new()
    }
}
