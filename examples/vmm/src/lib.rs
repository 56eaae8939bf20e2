//! # multifd-example-vmm
//!
//! A minimal KVM VMM (x86-64 host) that runs the live-migration test guest
//! `guest/loop.asm`, the groundwork for migrating a *running* guest with
//! the `multifd` library: a [`Vm`] that can be paused, resumed, saved and
//! restored from another thread, and dirty-page tracking behind one trait,
//! [`DirtyLog`], with three mechanisms ([`DirtyTracking`]).
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
//! ## Migration order (for the wiring to come)
//! Source: start the dirty log before the first RAM round; each round,
//! `collect_dirty` then send those pages; at switchover **pause** (when it
//! returns the vCPU is out of KVM_RUN and, with the ring, every dirtied gfn
//! is already in the ring), then one last `collect_dirty`, send those
//! pages, then [`Vm::save_state`] as the device state. Destination: create
//! a [`Vm`] with the same `mem_size`, receive RAM into [`Vm::region`] (or
//! the `--mem-file`), [`Vm::restore_state`], [`Vm::start`].

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
