//! # multifd-example-vmm
//!
//! A minimal KVM VMM (x86-64 host) that runs the live-migration test guest
//! `guest/loop.asm` and migrates it live with the `multifd` library: a
//! [`Vm`] that can be paused, resumed, throttled, saved and restored from
//! another thread, dirty-page tracking behind one trait, [`DirtyLog`],
//! with three mechanisms ([`DirtyTracking`]), and the library embedding in
//! [`migration`].
//!
//! ## The guest and how it is entered
//! The guest is a 512-byte boot sector: it switches to 32-bit protected
//! mode, then loops over the pages of `[START, END)` incrementing byte 0 of
//! each and writes a marker to serial port 0x3f8 after every pass. There is
//! no BIOS here. The sector is loaded at 0x7c00 like a BIOS would, and the
//! vCPU is started **directly in 32-bit protected mode** at the program's
//! `pm32` label: `loop.asm` ends with a small trailer (`"PM32"` and the
//! address of `pm32`, in bytes a BIOS never reads), so the same binary
//! serves QEMU and us, and the VMM needs no symbol table or listing. The
//! VMM writes a GDT with the program's own flat descriptors (code 0x08,
//! data 0x10) at 0x500, loads CS/DS/ES/FS/GS/SS from them, sets CR0.PE and
//! ESP = 0x7c00. A sector without the trailer (or [`EntryMode::Real`]) is
//! started in real mode at 0000:7c00 as a BIOS hands off, and the program
//! enters protected mode itself (the A20 port 0x92 is emulated for that).
//!
//! ## Devices
//! None but the serial marker counter: port I/O to 0x3f8 counts a marker
//! (optionally echoed), 0x92 keeps its value, other ports read 0 and
//! ignore writes, MMIO reads all-ones. There is no in-kernel irqchip: the
//! guest runs with interrupts off.
//!
//! ## Dirty tracking
//! * [`DirtyTracking::Ring`]: `KVM_CAP_DIRTY_LOG_RING_ACQ_REL` (or the
//!   plain ring), one ring per vCPU mapped from the vCPU fd; harvested on
//!   `collect_dirty` and on `KVM_EXIT_DIRTY_RING_FULL`, then
//!   `KVM_RESET_DIRTY_RINGS`.
//!
//!   On `kvm_pvm` hosts (KVM without hardware virtualisation, e.g. inside
//!   a cloud VM) the kernel does not stop the vCPU at the ring's soft limit
//!   and pushes past a full ring (a "should never get full" warning from
//!   virt/kvm/dirty_ring.c), overwriting entries. The VMM reports a ring
//!   found full as an error rather than lose pages, and
//!   [`DirtyTracking::Auto`] picks the bitmap there ([`ring_overflows`]).
//!   The ring is still correct when collected before it fills (65536
//!   entries, the maximum, last ~200 ms against this guest there).
//! * [`DirtyTracking::Bitmap`]: `KVM_GET_DIRTY_LOG` (get and clear).
//! * [`DirtyTracking::WriteProtect`]: the engine's
//!   [`multifd::WriteTracker`] (userfaultfd asynchronous write-protect
//!   plus `PAGEMAP_SCAN`) on the host mapping; KVM faults guest writes in
//!   through the same page tables, so no KVM dirty logging is needed.
//!
//! ## Live migration ([`migration`])
//! Source ([`migration::LiveSource`], the library's `SourceVm`): the dirty
//! log is started with the VM and emptied before round 1 (which sends every
//! page); each round `collect_dirty`, then those pages; at switchover
//! **pause** (when it returns the vCPU is out of KVM_RUN and, with the
//! ring, every dirtied gfn is already in the ring), one last
//! `collect_dirty`, those pages, then [`Vm::save_state`] as the device
//! state, wrapped by `multifd::device_state_section`. Auto-converge calls
//! [`Vm::set_throttle`]: in each 10 ms timeslice the vCPU ran, it then
//! sleeps `p / (100 - p)` timeslices (QEMU's cpu-throttle), a ticker thread
//! kicking it out of KVM_RUN once per timeslice. A failed or cancelled
//! migration resumes the VM. Guest RAM is the VM's own mapping, no copy.
//!
//! Destination ([`migration::IncomingMachine`], a `RamProvider`): creates
//! a [`Vm`] with the RAM size the source announces, receives straight into
//! its mapping, then [`migration::resume_incoming`] restores the state
//! from `Incoming::device_state` and starts the vCPU. The binary's
//! `--incoming URI` / `--migrate-to URI` do this across processes.
//!
//! ## Without KVM
//! [`SoftVm`] is a workload thread doing what the guest does (increment
//! byte 0 of each page of the range, one marker per pass) on a host
//! mapping, with the same pause / resume / throttle / state surface; its
//! dirty pages come from the write-protect tracker. [`Machine`] is either.
//! `MULTIFD_VMM_NO_KVM=1` ([`NO_KVM_ENV`]) selects it.

pub mod checker;
mod dirty;
mod machine;
pub mod migration;
mod soft;
pub mod state;
mod vm;

pub use dirty::{BitmapLog, DirtyLog, DirtyTracking, PAGE, RingLog, WriteProtectLog};
pub use machine::{Machine, NO_KVM_ENV, no_kvm_forced};
pub use soft::SoftVm;
pub use state::VmState;
pub use vm::{
    BOOT_ADDR, Entry, EntryMode, GDT_ADDR, PM32_MAGIC, RunState, SERIAL_PORT, Vm, VmConfig,
    ring_overflows,
};
