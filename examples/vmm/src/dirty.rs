//! Dirty-page tracking of the guest RAM slot: the KVM dirty ring, the KVM
//! dirty bitmap, or (without KVM's help) userfaultfd write-protect through
//! the engine's [`WriteTracker`].
//!
//! All three answer the same question through [`DirtyLog`]: which pages of
//! the slot were written since the last time I asked?

use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::{KVM_DIRTY_LOG_PAGE_OFFSET, KVMIO, kvm_dirty_gfn};
use kvm_ioctls::{VcpuFd, VmFd};
use multifd::WriteTracker;
use vmm_sys_util::ioctl::ioctl;
use vmm_sys_util::ioctl_io_nr;

use crate::vm::Core;

/// Page size of the slot (x86 KVM tracks 4 KiB pages).
pub const PAGE: u64 = 4096;

/// `KVM_DIRTY_GFN_F_DIRTY` (linux/kvm.h): the kernel published the entry.
const GFN_DIRTY: u32 = 1 << 0;
/// `KVM_DIRTY_GFN_F_RESET`: userspace harvested it; the kernel may recycle
/// it at the next `KVM_RESET_DIRTY_RINGS`.
const GFN_RESET: u32 = 1 << 1;

ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, KVMIO, 0xc7);

/// Which pages of the guest RAM slot were written since the last call.
pub trait DirtyLog: Send {
    /// Byte offsets within the slot (multiples of 4096, ascending, no
    /// duplicates) of the pages written since the previous call, or since
    /// the guest started for the first call. An error means pages may have
    /// been missed: a migration must fail rather than go on.
    fn collect_dirty(&mut self) -> io::Result<Vec<u64>>;
    /// The mechanism, for logs: "ring", "bitmap" or "write-protect".
    fn kind(&self) -> &'static str;
}

/// Which mechanism a [`crate::Vm`] tracks dirty pages with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DirtyTracking {
    /// No tracking.
    None,
    /// The dirty ring where the kernel offers it, else the bitmap.
    #[default]
    Auto,
    /// `KVM_CAP_DIRTY_LOG_RING(_ACQ_REL)`: per-vCPU rings of dirtied gfns.
    Ring,
    /// `KVM_GET_DIRTY_LOG`: a bitmap per slot.
    Bitmap,
    /// userfaultfd asynchronous write-protect + `PAGEMAP_SCAN` on the
    /// host mapping, no KVM dirty logging at all.
    WriteProtect,
}

/// Set of dirty pages of one slot, one bit a page.
#[derive(Debug)]
pub(crate) struct PageSet {
    bits: Vec<u64>,
    pages: u64,
}

impl PageSet {
    pub(crate) fn new(pages: u64) -> Self {
        Self {
            bits: vec![0; pages.div_ceil(64) as usize],
            pages,
        }
    }

    fn insert(&mut self, page: u64) -> bool {
        if page >= self.pages {
            return false;
        }
        self.bits[(page / 64) as usize] |= 1 << (page % 64);
        true
    }

    /// Ascending byte offsets of the set pages; empties the set.
    fn drain_offsets(&mut self) -> Vec<u64> {
        let mut out = Vec::new();
        offsets_of_bitmap(&self.bits, &mut out);
        self.bits.iter_mut().for_each(|w| *w = 0);
        out
    }
}

fn offsets_of_bitmap(bits: &[u64], out: &mut Vec<u64>) {
    for (i, &w) in bits.iter().enumerate() {
        let mut w = w;
        while w != 0 {
            let b = u64::from(w.trailing_zeros());
            out.push((i as u64 * 64 + b) * PAGE);
            w &= w - 1;
        }
    }
}

/// One vCPU's dirty ring: `entries` `struct kvm_dirty_gfn` mapped from the
/// vCPU fd at `KVM_DIRTY_LOG_PAGE_OFFSET` pages.
#[derive(Debug)]
pub(crate) struct DirtyRing {
    gfns: NonNull<kvm_dirty_gfn>,
    entries: u32,
    /// Next entry to look at (the kernel's `reset_index` follows us).
    fetch: u32,
}

// SAFETY: the ring is plain shared memory owned by this struct (unmapped
// on drop); every access goes through `&mut self` and atomics, so moving
// it to another thread is fine.
unsafe impl Send for DirtyRing {}

impl DirtyRing {
    /// Maps the ring of `vcpu`, `entries` entries (the size the VM enabled).
    pub(crate) fn map(vcpu: &VcpuFd, entries: u32) -> io::Result<Self> {
        use std::os::fd::AsRawFd;
        let len = entries as usize * std::mem::size_of::<kvm_dirty_gfn>();
        // SAFETY: a fresh shared mapping of the vCPU fd's dirty-ring area
        // (documented in the KVM API for KVM_CAP_DIRTY_LOG_RING); it
        // creates new memory and touches nothing existing.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                (KVM_DIRTY_LOG_PAGE_OFFSET as i64) * PAGE as i64,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            gfns: NonNull::new(p.cast()).expect("mmap returned a non-null address"),
            entries,
            fetch: 0,
        })
    }

    /// Moves every published entry into `into` (slot 0 only) and marks it
    /// harvested. Returns how many entries were taken.
    fn harvest(&mut self, into: &mut PageSet) -> usize {
        let mut n = 0;
        loop {
            let i = (self.fetch % self.entries) as usize;
            // SAFETY: `i < entries`, inside the mapping, which lives as
            // long as `self`. `kvm_dirty_gfn` is 16-byte aligned in the
            // ring and its first field is a u32 the kernel writes
            // concurrently: accessed only as an atomic.
            let entry = unsafe { self.gfns.as_ptr().add(i) };
            // SAFETY: as above; `flags` is at offset 0, 4-byte aligned.
            let flags = unsafe { AtomicU32::from_ptr(std::ptr::addr_of_mut!((*entry).flags)) };
            // Acquire: the slot/offset the kernel wrote before publishing
            // (KVM_CAP_DIRTY_LOG_RING_ACQ_REL semantics).
            if flags.load(Ordering::Acquire) & GFN_DIRTY == 0 {
                break;
            }
            // SAFETY: published entry; the kernel does not write it again
            // until we mark it reset and call KVM_RESET_DIRTY_RINGS.
            let (slot, offset) = unsafe {
                (
                    std::ptr::addr_of!((*entry).slot).read_volatile(),
                    std::ptr::addr_of!((*entry).offset).read_volatile(),
                )
            };
            if slot == 0 && !into.insert(offset) {
                tracing::warn!(offset, "dirty ring: gfn offset outside the slot");
            }
            flags.store(GFN_RESET, Ordering::Release);
            self.fetch = self.fetch.wrapping_add(1);
            n += 1;
        }
        n
    }
}

impl Drop for DirtyRing {
    fn drop(&mut self) {
        let len = self.entries as usize * std::mem::size_of::<kvm_dirty_gfn>();
        // SAFETY: unmaps exactly the mapping made in `map`, which nothing
        // else references (the struct is being dropped).
        unsafe { libc::munmap(self.gfns.as_ptr().cast(), len) };
    }
}

/// The rings of all vCPUs plus what was harvested from them and not yet
/// handed to a [`DirtyLog`] caller (a ring-full exit harvests too).
#[derive(Debug)]
pub(crate) struct RingSet {
    pub(crate) rings: Vec<DirtyRing>,
    pending: PageSet,
    /// Ring-full exits handled so far.
    pub(crate) full_exits: u64,
}

impl RingSet {
    pub(crate) fn new(pages: u64) -> Self {
        Self {
            rings: Vec::new(),
            pending: PageSet::new(pages),
            full_exits: 0,
        }
    }

    /// Harvests every ring and lets the kernel recycle the entries.
    /// Returns (entries harvested, entries the kernel recycled).
    ///
    /// A ring found completely full may have been pushed past its end (the
    /// kernel is meant to stop the vCPU at the soft limit, 64+ entries
    /// earlier, but on some kernels it does not: see the crate docs), which
    /// overwrites entries, i.e. loses dirty pages: that is an error.
    pub(crate) fn harvest_and_reset(&mut self, vm: &VmFd) -> io::Result<(usize, usize)> {
        let mut n = 0;
        for r in &mut self.rings {
            let got = r.harvest(&mut self.pending);
            if got >= r.entries as usize {
                return Err(io::Error::other(format!(
                    "KVM dirty ring of {} entries found full: the kernel may have \
                     overwritten entries, dirty pages are lost (use the bitmap)",
                    r.entries
                )));
            }
            n += got;
        }
        // Always, even with nothing new: entries harvested before an
        // interrupted reset are recycled now.
        // SAFETY: KVM_RESET_DIRTY_RINGS takes no argument; it re-protects
        // the harvested gfns and recycles entries marked reset.
        let ret = unsafe { ioctl(vm, KVM_RESET_DIRTY_RINGS()) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok((n, ret as usize))
    }
}

/// [`DirtyLog`] over the KVM dirty rings.
pub struct RingLog {
    // Rings first: dropped before the last `Core` (and guest RAM) can go.
    pub(crate) rings: Arc<Mutex<RingSet>>,
    pub(crate) core: Arc<Core>,
}

impl DirtyLog for RingLog {
    fn collect_dirty(&mut self) -> io::Result<Vec<u64>> {
        let mut set = self.rings.lock().unwrap_or_else(|p| p.into_inner());
        set.harvest_and_reset(&self.core.vm_fd)?;
        Ok(set.pending.drain_offsets())
    }
    fn kind(&self) -> &'static str {
        "ring"
    }
}

/// [`DirtyLog`] over `KVM_GET_DIRTY_LOG` (get and clear in one call).
pub struct BitmapLog {
    pub(crate) core: Arc<Core>,
}

impl DirtyLog for BitmapLog {
    fn collect_dirty(&mut self) -> io::Result<Vec<u64>> {
        let bits = self
            .core
            .vm_fd
            .get_dirty_log(0, self.core.mem_size as usize)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        let mut out = Vec::new();
        offsets_of_bitmap(&bits, &mut out);
        Ok(out)
    }
    fn kind(&self) -> &'static str {
        "bitmap"
    }
}

/// [`DirtyLog`] over the engine's userfaultfd [`WriteTracker`] on the host
/// mapping of guest RAM: KVM faults guest writes in through the same page
/// tables, so they are seen like any other write.
pub struct WriteProtectLog {
    pub(crate) tracker: WriteTracker,
}

impl DirtyLog for WriteProtectLog {
    fn collect_dirty(&mut self) -> io::Result<Vec<u64>> {
        let mut out = Vec::new();
        self.tracker
            .collect(&mut out)
            .map_err(|e| io::Error::other(e.to_string()))?;
        Ok(out)
    }
    fn kind(&self) -> &'static str {
        "write-protect"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_set_drains_ascending_offsets() {
        let mut s = PageSet::new(130);
        for p in [129, 0, 64, 63, 64] {
            assert!(s.insert(p));
        }
        assert!(!s.insert(130));
        assert_eq!(s.drain_offsets(), vec![0, 63 * PAGE, 64 * PAGE, 129 * PAGE]);
        assert!(s.drain_offsets().is_empty());
    }
}
