//! The example VMM under KVM running guest/loop.asm: boot (protected and
//! real-mode entry), markers, pause/resume, save/restore into a second VM
//! (anonymous RAM and a shared RAM file).
//!
//! Needs /dev/kvm and nasm: without them every test prints SKIPPED, or
//! fails when `CI` is set.

mod common;

use std::time::{Duration, Instant};

use common::{WAIT, boot_sector, can_run, check_consistent, config, counters};
use multifd_example_vmm::{DirtyTracking, Entry, EntryMode, RunState, Vm, VmConfig, VmState};

fn boot(cfg: &VmConfig, mode: EntryMode) -> (Vm, Entry) {
    let mut vm = Vm::new(cfg).expect("Vm::new");
    let entry = vm
        .load_boot_sector(&boot_sector(), mode)
        .expect("load_boot_sector");
    vm.start().expect("start");
    (vm, entry)
}

#[test]
fn boots_in_protected_mode_and_pauses_after_markers() {
    if !can_run() {
        return;
    }
    let cfg = VmConfig {
        pause_after_markers: Some(20),
        dirty: DirtyTracking::None,
        ..config()
    };
    let t = Instant::now();
    let (vm, entry) = boot(&cfg, EntryMode::Auto);
    assert!(
        matches!(entry, Entry::Protected(eip) if eip > 0x7c00),
        "{entry:?}"
    );
    vm.wait_paused(WAIT).expect("pause after 20 markers");
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(vm.markers(), 20);
    // Paused right after the 20th marker: every counter is exactly 20.
    let s = counters(&vm);
    assert_eq!((s.value, s.advanced), (20, 0), "{s:?}");
    eprintln!(
        "protected-mode entry at {entry:?}: 20 passes over {} pages in {secs:.2} s ({:.0} markers/s)",
        s.pages,
        20.0 / secs
    );
}

#[test]
fn boots_in_real_mode_like_a_bios() {
    if !can_run() {
        return;
    }
    let cfg = VmConfig {
        pause_after_markers: Some(3),
        dirty: DirtyTracking::None,
        ..config()
    };
    let (vm, entry) = boot(&cfg, EntryMode::Real);
    assert_eq!(entry, Entry::Real);
    vm.wait_paused(WAIT).expect("pause after 3 markers");
    let s = counters(&vm);
    assert_eq!((s.value, s.advanced), (3, 0), "{s:?}");
}

#[test]
fn pause_stops_markers_and_ram_resume_continues() {
    if !can_run() {
        return;
    }
    let (vm, _) = boot(&config(), EntryMode::Auto);
    assert!(vm.wait_markers(3, WAIT), "no markers: {:?}", vm.run_state());
    for round in 0..5 {
        let t = Instant::now();
        vm.pause().expect("pause");
        let pause_latency = t.elapsed();
        assert_eq!(vm.run_state(), RunState::Paused);
        let m = vm.markers();
        let s = check_consistent(&vm);
        std::thread::sleep(Duration::from_millis(150));
        assert_eq!(vm.markers(), m, "round {round}: markers moved while paused");
        assert_eq!(counters(&vm), s, "round {round}: RAM changed while paused");
        vm.resume().expect("resume");
        assert!(
            vm.wait_markers(m + 2, WAIT),
            "round {round}: no markers after resume"
        );
        eprintln!("round {round}: paused in {pause_latency:?} at {m} markers, {s:?}");
    }
}

/// Runs a source VM, pauses it, carries RAM + state into a second VM, and
/// checks the guest goes on there from where it was.
/// `copy_ram` runs while the source is paused, before the destination
/// exists: it copies the RAM file, or returns an image to write.
fn migrate_by_hand(
    src_cfg: VmConfig,
    dst_cfg: VmConfig,
    copy_ram: impl Fn(&Vm) -> Option<Vec<u8>>,
) {
    let (src, _) = boot(&src_cfg, EntryMode::Auto);
    assert!(src.wait_markers(5, WAIT), "source: no markers");
    src.pause().expect("pause");
    let at = check_consistent(&src);
    let markers = src.markers();
    let state = src.save_state().expect("save_state");

    let image = copy_ram(&src);
    drop(src);
    let mut dst = Vm::new(&dst_cfg).expect("destination");
    if let Some(image) = image {
        dst.write_memory(0, &image).expect("write destination RAM");
    }
    dst.restore_state(&state).expect("restore_state");
    assert_eq!(
        dst.markers(),
        markers,
        "the marker count is part of the state"
    );
    assert_eq!(counters(&dst), at, "RAM copy");
    // The same vCPU state back out before running (but the TSC, which
    // keeps counting).
    let (a, b) = (
        VmState::from_bytes(&state).expect("decode"),
        VmState::from_bytes(&dst.save_state().expect("save again")).expect("decode"),
    );
    assert!(
        a.regs == b.regs && a.sregs == b.sregs && a.fpu == b.fpu,
        "vCPU state differs"
    );
    assert_eq!(a.markers, b.markers);
    dst.start().expect("start destination");
    assert!(
        dst.wait_markers(markers + 5, WAIT),
        "destination: markers stuck at {} ({:?})",
        dst.markers(),
        dst.run_state()
    );
    dst.pause().expect("pause destination");
    // Counters that went on from `at` in step with the markers counted
    // from the restored value: RAM, vCPU state and device state all match.
    let now = check_consistent(&dst);
    eprintln!(
        "source paused at {markers} markers {at:?}; destination at {} markers {now:?}; state {} bytes",
        dst.markers(),
        state.len()
    );
}

#[test]
fn save_restore_into_a_second_vm_anonymous_ram() {
    if !can_run() {
        return;
    }
    let cfg = VmConfig {
        dirty: DirtyTracking::None,
        ..config()
    };
    migrate_by_hand(cfg.clone(), cfg, |src| {
        let mut image = vec![0u8; src.mem_size() as usize];
        src.read_memory(0, &mut image).expect("read source RAM");
        Some(image)
    });
}

#[test]
fn save_restore_into_a_second_vm_shared_ram_file() {
    if !can_run() {
        return;
    }
    let dir = tempfile::tempdir_in("/dev/shm").expect("/dev/shm");
    let (src_file, dst_file) = (dir.path().join("src.ram"), dir.path().join("dst.ram"));
    let src_cfg = VmConfig {
        mem_file: Some(src_file.clone()),
        dirty: DirtyTracking::None,
        ..config()
    };
    let dst_cfg = VmConfig {
        mem_file: Some(dst_file.clone()),
        ..src_cfg.clone()
    };
    // Like a snapshot on disk: the destination maps a copy of the file.
    migrate_by_hand(src_cfg, dst_cfg, |_| {
        std::fs::copy(&src_file, &dst_file).expect("copying the RAM file");
        None
    });
}

#[test]
fn restore_refuses_garbage_and_a_running_vcpu() {
    if !can_run() {
        return;
    }
    let (vm, _) = boot(&config(), EntryMode::Auto);
    assert!(vm.wait_markers(1, WAIT));
    assert!(vm.save_state().is_err(), "save while running");
    vm.pause().unwrap();
    let state = vm.save_state().unwrap();
    assert!(vm.restore_state(&state[..state.len() - 3]).is_err());
    vm.resume().unwrap();
    assert!(vm.restore_state(&state).is_err(), "restore while running");
}
