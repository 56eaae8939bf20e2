//! One interface over the two guests: the KVM [`Vm`] and the workload
//! [`SoftVm`] (no KVM, write-protect dirty tracking).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use vm_memory::mmap::MmapRegion;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::dirty::DirtyLog;
use crate::soft::SoftVm;
use crate::vm::{RunState, Vm};

/// Set (to anything but `0`) to run the workload guest instead of KVM,
/// with write-protect dirty tracking, even where `/dev/kvm` exists.
pub const NO_KVM_ENV: &str = "MULTIFD_VMM_NO_KVM";

/// Whether [`NO_KVM_ENV`] asks for the workload guest.
pub fn no_kvm_forced() -> bool {
    std::env::var_os(NO_KVM_ENV).is_some_and(|v| v != "0")
}

/// A guest: KVM or the workload thread.
#[derive(Debug)]
pub enum Machine {
    /// The boot sector under KVM.
    Kvm(Vm),
    /// The workload thread.
    Soft(SoftVm),
}

macro_rules! each {
    ($self:expr, $m:ident => $e:expr) => {
        match $self {
            Machine::Kvm($m) => $e,
            Machine::Soft($m) => $e,
        }
    };
}

impl Machine {
    /// Guest RAM.
    pub fn memory(&self) -> &GuestMemoryMmap {
        each!(self, m => m.memory())
    }

    /// The host mapping of guest RAM.
    pub fn region(&self) -> &Arc<MmapRegion> {
        each!(self, m => m.region())
    }

    /// Bytes of guest RAM.
    pub fn mem_size(&self) -> u64 {
        self.region().size() as u64
    }

    /// Copies guest RAM at `addr` into `buf`.
    pub fn read_memory(&self, addr: u64, buf: &mut [u8]) -> Result<()> {
        Ok(self.memory().read_slice(buf, GuestAddress(addr))?)
    }

    /// Markers so far.
    pub fn markers(&self) -> u64 {
        each!(self, m => m.markers())
    }

    /// What the vCPU (or workload) thread is doing.
    pub fn run_state(&self) -> RunState {
        each!(self, m => m.run_state())
    }

    /// Starts the vCPU (or workload) thread.
    pub fn start(&mut self) -> Result<()> {
        each!(self, m => m.start())
    }

    /// Stops the guest; when it returns, guest RAM no longer changes.
    pub fn pause(&self) -> Result<()> {
        each!(self, m => m.pause())
    }

    /// Lets it run again.
    pub fn resume(&self) -> Result<()> {
        each!(self, m => m.resume())
    }

    /// Auto-converge throttle, percent.
    pub fn set_throttle(&self, percent: u8) {
        each!(self, m => m.set_throttle(percent));
    }

    /// The highest throttle set so far, percent.
    pub fn max_throttle(&self) -> u8 {
        each!(self, m => m.max_throttle())
    }

    /// The device state (vCPU registers or workload position, markers).
    pub fn save_state(&self) -> Result<Vec<u8>> {
        each!(self, m => m.save_state())
    }

    /// Loads a [`Machine::save_state`].
    pub fn restore_state(&self, bytes: &[u8]) -> Result<()> {
        each!(self, m => m.restore_state(bytes))
    }

    /// Takes the dirty log.
    pub fn take_dirty_log(&mut self) -> Option<Box<dyn DirtyLog>> {
        each!(self, m => m.take_dirty_log())
    }

    /// "ring", "bitmap", "write-protect" or "none".
    pub fn dirty_kind(&self) -> &'static str {
        match self {
            Machine::Kvm(m) => m.dirty_kind(),
            Machine::Soft(_) => "write-protect",
        }
    }

    /// "kvm" or "workload".
    pub fn kind(&self) -> &'static str {
        match self {
            Machine::Kvm(_) => "kvm",
            Machine::Soft(_) => "workload",
        }
    }

    /// Waits until `n` markers were written (true) or `timeout` passed.
    pub fn wait_markers(&self, n: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.markers() < n {
            if Instant::now() >= deadline || matches!(self.run_state(), RunState::Exited(_)) {
                return self.markers() >= n;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    /// Stops the guest thread for good.
    pub fn shutdown(&mut self) -> Result<()> {
        each!(self, m => m.shutdown())
    }
}
