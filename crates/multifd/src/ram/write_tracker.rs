//! Write tracking of a mapped range without KVM: userfaultfd write-protect
//! in asynchronous mode plus the `PAGEMAP_SCAN` ioctl (Linux 6.7+).
//!
//! How it works:
//! 1. A userfaultfd is opened with `UFFD_FEATURE_WP_ASYNC` (plus
//!    `UFFD_FEATURE_WP_UNPOPULATED` and `UFFD_FEATURE_WP_HUGETLBFS_SHMEM`
//!    when offered) and the range is registered in write-protect mode, then
//!    write-protected whole (`UFFDIO_WRITEPROTECT`).
//! 2. A write to a protected page faults; in asynchronous mode the kernel
//!    resolves the fault itself by clearing the page's uffd-wp bit: no
//!    thread ever waits on the userfaultfd and nobody reads it.
//! 3. [`WriteTracker::collect`] runs `PAGEMAP_SCAN` over the range with
//!    `PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC` and the category
//!    `PAGE_IS_WRITTEN`: under each page-table lock the kernel reports the
//!    pages whose bit is clear and protects them again, then flushes the
//!    TLB before returning.
//!
//! Guarantee: a write that completes before `collect` starts is reported by
//! that `collect`; a write that starts after `collect` returns faults and
//! is reported by a later `collect`; a write racing with `collect` is
//! reported by this one or the next. Nothing is lost, so a migration that
//! re-sends every reported page after reading it converges to the final
//! contents. False positives: a page is reported when it was written
//! (even with the same bytes). Only writes through *this process's*
//! mapping are seen: KVM guest writes into it are (KVM faults them in
//! through the same page tables), writes through another mapping of the
//! same file (another process, `write(2)`) are not.
//!
//! Privileges: the userfaultfd is opened with `UFFD_USER_MODE_ONLY`, which
//! Linux allows to unprivileged processes whatever
//! `vm.unprivileged_userfaultfd` says; asynchronous write-protect faults are
//! resolved in the kernel for kernel-mode accesses too, so that flag costs
//! nothing here. On kernels without the flag (< 5.11) we retry without it;
//! there an unprivileged process with `vm.unprivileged_userfaultfd = 0`
//! gets `EPERM`, reported as [`WriteTrackerError::PermissionDenied`].
//! Kernels before 6.7 (no `WP_ASYNC` or no `PAGEMAP_SCAN`) give
//! [`WriteTrackerError::Unsupported`].
//!
//! The ioctl numbers and structures below are not in the `libc` crate (as
//! of 0.2.191, which only has `SYS_userfaultfd`); they are transcribed from
//! the kernel's uapi headers `linux/userfaultfd.h` and `linux/fs.h`, which
//! are a stable ABI.
#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::Arc;

use vm_memory::mmap::MmapRegion;

/// Granularity of the reported offsets.
const PAGE: u64 = 4096;

// linux/userfaultfd.h
const UFFD_API: u64 = 0xaa;
const UFFD_USER_MODE_ONLY: libc::c_int = 1;
/// `_IOWR(0xAA, 0x3F, struct uffdio_api)` (24 bytes).
const UFFDIO_API: libc::c_ulong = 0xc018_aa3f;
/// `_IOWR(0xAA, 0x00, struct uffdio_register)` (32 bytes).
const UFFDIO_REGISTER: libc::c_ulong = 0xc020_aa00;
/// `_IOR(0xAA, 0x01, struct uffdio_range)` (16 bytes).
const UFFDIO_UNREGISTER: libc::c_ulong = 0x8010_aa01;
/// `_IOWR(0xAA, 0x06, struct uffdio_writeprotect)` (24 bytes).
const UFFDIO_WRITEPROTECT: libc::c_ulong = 0xc018_aa06;
/// Bit of `_UFFDIO_WRITEPROTECT` in `uffdio_register.ioctls`.
const UFFDIO_WRITEPROTECT_IOCTL_BIT: u64 = 1 << 0x06;
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

// linux/fs.h
/// `_IOWR('f', 16, struct pm_scan_arg)` (96 bytes).
const PAGEMAP_SCAN: libc::c_ulong = 0xc060_6610;
const PAGE_IS_WRITTEN: u64 = 1 << 1;
const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

#[repr(C)]
#[derive(Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// Regions one `PAGEMAP_SCAN` call may return (24 bytes each). A region is
/// a run of consecutive written pages; a full buffer means another call.
///
/// Not more than 512: the kernel copies out through a bounce buffer of
/// `min(512, vec_len)` regions and loops when it fills; after such an
/// internal restart, a walk that then completes leaves `walk_end` at the
/// restart point instead of `end` (seen on 6.18; `do_pagemap_scan` only
/// sets it when it is still zero). With at most 512 regions the kernel
/// stops exactly when our buffer is full and `walk_end` is right.
const REGIONS_PER_SCAN: usize = 512;

/// Why a [`WriteTracker`] could not be set up or could not collect.
#[derive(Debug, thiserror::Error)]
pub enum WriteTrackerError {
    /// Opening the userfaultfd was refused (`EPERM`): on a kernel without
    /// `UFFD_USER_MODE_ONLY` an unprivileged process needs
    /// `vm.unprivileged_userfaultfd = 1` or `CAP_SYS_PTRACE`.
    #[error("userfaultfd refused ({0}): run privileged or set vm.unprivileged_userfaultfd=1")]
    PermissionDenied(#[source] io::Error),
    /// The kernel lacks something the tracker needs (`what` says which).
    #[error("write tracking unsupported here: {what} ({source})")]
    Unsupported {
        /// The missing piece.
        what: &'static str,
        /// What the kernel answered.
        #[source]
        source: io::Error,
    },
    /// The range is empty, not page-aligned, or not a mapping the kernel
    /// accepts for write-protect tracking.
    #[error("bad range {start:#x}+{len:#x}: {reason}")]
    InvalidRange {
        /// Start address.
        start: u64,
        /// Length in bytes.
        len: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// Any other system call failure.
    #[error("{op}: {source}")]
    Io {
        /// The operation that failed.
        op: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
}

type Result<T> = std::result::Result<T, WriteTrackerError>;

fn io_err(op: &'static str) -> WriteTrackerError {
    WriteTrackerError::Io {
        op,
        source: io::Error::last_os_error(),
    }
}

/// Reports which pages of a mapping were written since the last time it
/// was asked, without KVM (see the [module documentation](self)).
///
/// Dropping the tracker unregisters the range; pages then behave as if
/// never tracked.
pub struct WriteTracker {
    uffd: OwnedFd,
    pagemap: File,
    start: u64,
    len: u64,
    regions: Vec<PageRegion>,
    /// Keeps the tracked mapping alive when the tracker was built from an
    /// owned region. Declared last: dropped after `Drop::drop` unregistered.
    _mapping: Option<Arc<dyn Send + Sync>>,
}

impl std::fmt::Debug for WriteTracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteTracker")
            .field("start", &format_args!("{:#x}", self.start))
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl WriteTracker {
    /// Tracks writes to all of `region`, which the tracker keeps mapped
    /// for as long as it lives. A `GuestRegionMmap` gives its region with
    /// `get_mmap()`.
    ///
    /// The region must be anonymous, shared memory (tmpfs, `memfd`),
    /// hugetlbfs, or (Linux 6.7+ in asynchronous mode) any file mapping, and
    /// no other userfaultfd may be registered on it.
    pub fn new<B: vm_memory::bitmap::Bitmap + Send + Sync + 'static>(
        region: Arc<MmapRegion<B>>,
    ) -> Result<Self> {
        let addr =
            NonNull::new(region.as_ptr()).ok_or_else(|| WriteTrackerError::InvalidRange {
                start: 0,
                len: region.size() as u64,
                reason: "null mapping".into(),
            })?;
        // SAFETY: `region` is a live mapping of `size()` bytes at
        // `as_ptr()` (MmapRegion's invariant) and the tracker keeps the Arc,
        // so it stays mapped until the tracker is dropped.
        let mut tracker = unsafe { Self::from_raw_parts(addr, region.size())? };
        tracker._mapping = Some(region);
        Ok(tracker)
    }

    /// Tracks writes to `[addr, addr + len)`.
    ///
    /// # Safety
    /// The range must be page-aligned memory mapped in this process, owned
    /// by the caller, that stays mapped (not unmapped, not replaced by
    /// another mapping) until the tracker is dropped, and that no other
    /// userfaultfd user of the process registers. The tracker changes how
    /// the kernel handles write faults in the range and unregisters it on
    /// drop; pointed at memory someone else manages (another allocator's
    /// arena, a range a postcopy handler has registered), that would break
    /// that user's assumptions.
    pub unsafe fn from_raw_parts(addr: NonNull<u8>, len: usize) -> Result<Self> {
        let start = addr.as_ptr() as u64;
        let len = len as u64;
        let bad = |reason: &str| WriteTrackerError::InvalidRange {
            start,
            len,
            reason: reason.to_owned(),
        };
        if len == 0 || !start.is_multiple_of(PAGE) || !len.is_multiple_of(PAGE) {
            return Err(bad("empty or not page-aligned"));
        }
        if start.checked_add(len).is_none() {
            return Err(bad("wraps around the address space"));
        }

        let supported = {
            let probe = open_uffd()?;
            let mut api = UffdioApi {
                api: UFFD_API,
                ..Default::default()
            };
            uffdio_api(&probe, &mut api)?;
            api.features
        };
        if supported & UFFD_FEATURE_WP_ASYNC == 0 {
            return Err(WriteTrackerError::Unsupported {
                what: "UFFD_FEATURE_WP_ASYNC (Linux 6.7)",
                source: io::Error::from_raw_os_error(libc::EOPNOTSUPP),
            });
        }
        let features = UFFD_FEATURE_WP_ASYNC
            | (supported & (UFFD_FEATURE_WP_UNPOPULATED | UFFD_FEATURE_WP_HUGETLBFS_SHMEM));
        // The features are fixed by the first UFFDIO_API call on an fd, so
        // the real one is a second descriptor.
        let uffd = open_uffd()?;
        let mut api = UffdioApi {
            api: UFFD_API,
            features,
            ioctls: 0,
        };
        uffdio_api(&uffd, &mut api)?;

        let range = UffdioRange { start, len };
        let mut reg = UffdioRegister {
            range,
            mode: UFFDIO_REGISTER_MODE_WP,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes a `struct uffdio_register`,
        // which `reg` is (same layout, 32 bytes), valid for the call. It
        // changes no memory of ours; the caller vouched for the range.
        if unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_REGISTER, &mut reg) } < 0 {
            let e = io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::EBUSY) => bad("already registered with another userfaultfd"),
                Some(libc::EINVAL) | Some(libc::ENOMEM) => bad(&format!(
                    "not a mapping that supports userfaultfd write-protect ({e})"
                )),
                // The descriptor was granted; EPERM here is a mapping that
                // can never be written (a file opened read-only).
                Some(libc::EPERM) => bad(&format!("a mapping that cannot be written ({e})")),
                _ => WriteTrackerError::Io {
                    op: "UFFDIO_REGISTER",
                    source: e,
                },
            });
        }
        // From here on, dropping `tracker` unregisters.
        let pagemap = File::open("/proc/self/pagemap").map_err(|source| WriteTrackerError::Io {
            op: "opening /proc/self/pagemap",
            source,
        })?;
        let mut tracker = Self {
            uffd,
            pagemap,
            start,
            len,
            regions: vec![PageRegion::default(); REGIONS_PER_SCAN],
            _mapping: None,
        };
        if reg.ioctls & UFFDIO_WRITEPROTECT_IOCTL_BIT == 0 {
            return Err(WriteTrackerError::Unsupported {
                what: "UFFDIO_WRITEPROTECT on this mapping",
                source: io::Error::from_raw_os_error(libc::EOPNOTSUPP),
            });
        }
        let mut wp = UffdioWriteprotect {
            range,
            mode: UFFDIO_WRITEPROTECT_MODE_WP,
        };
        // SAFETY: UFFDIO_WRITEPROTECT reads a `struct uffdio_writeprotect`,
        // which `wp` is (24 bytes). In asynchronous mode protecting only
        // makes later writes fault and be resolved by the kernel.
        if unsafe { libc::ioctl(tracker.uffd.as_raw_fd(), UFFDIO_WRITEPROTECT, &mut wp) } < 0 {
            return Err(io_err("UFFDIO_WRITEPROTECT"));
        }
        // Check PAGEMAP_SCAN now rather than at the first collect.
        let mut none = Vec::new();
        tracker.scan(&mut none, false).map_err(|e| match e {
            WriteTrackerError::Io { source, .. } if source.raw_os_error() == Some(libc::ENOTTY) => {
                WriteTrackerError::Unsupported {
                    what: "PAGEMAP_SCAN (Linux 6.7)",
                    source,
                }
            }
            e => e,
        })?;
        Ok(tracker)
    }

    /// Start address of the tracked range.
    pub fn start(&self) -> u64 {
        self.start
    }

    /// Length of the tracked range in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Never true: an empty range is refused.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends to `out`, in ascending order, the byte offsets (multiples of
    /// 4096, from the start of the range) of the pages written since the
    /// previous call (or since the tracker was made), and protects them
    /// again. Returns how many were appended.
    pub fn collect(&mut self, out: &mut Vec<u64>) -> Result<usize> {
        let before = out.len();
        self.scan(out, true)?;
        Ok(out.len() - before)
    }

    /// Runs PAGEMAP_SCAN over the range, re-protecting written pages, and
    /// appends their offsets to `out` when `report`.
    fn scan(&mut self, out: &mut Vec<u64>, report: bool) -> Result<()> {
        let end = self.start + self.len;
        let mut at = self.start;
        while at < end {
            let mut arg = PmScanArg {
                size: std::mem::size_of::<PmScanArg>() as u64,
                flags: PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
                start: at,
                end,
                vec: self.regions.as_mut_ptr() as u64,
                vec_len: self.regions.len() as u64,
                category_mask: PAGE_IS_WRITTEN,
                return_mask: PAGE_IS_WRITTEN,
                ..Default::default()
            };
            // SAFETY: PAGEMAP_SCAN reads `arg` (a `struct pm_scan_arg`, 96
            // bytes, `size` set) and writes at most `vec_len` `struct
            // page_region`s (24 bytes each) to `vec`, which points at
            // `self.regions`, borrowed mutably for the call. It changes no
            // other memory of ours (write protection is a page-table bit).
            let n = unsafe { libc::ioctl(self.pagemap.as_raw_fd(), PAGEMAP_SCAN, &mut arg) };
            if n < 0 {
                return Err(io_err("PAGEMAP_SCAN"));
            }
            let regions = &self.regions[..(n as usize).min(self.regions.len())];
            if report {
                for r in regions {
                    let mut p = r.start.max(self.start);
                    while p < r.end.min(end) {
                        out.push(p - self.start);
                        p += PAGE;
                    }
                }
            }
            // Where to go on: where the walk stopped, and never before the
            // end of what it reported (see REGIONS_PER_SCAN).
            let next = regions
                .last()
                .map_or(arg.walk_end, |r| r.end.max(arg.walk_end));
            if next <= at {
                // No progress would loop forever; the kernel always
                // advances, so this is a broken kernel or ABI mismatch.
                return Err(WriteTrackerError::Io {
                    op: "PAGEMAP_SCAN made no progress",
                    source: io::Error::from_raw_os_error(libc::EIO),
                });
            }
            at = next;
        }
        Ok(())
    }
}

impl Drop for WriteTracker {
    fn drop(&mut self) {
        let range = UffdioRange {
            start: self.start,
            len: self.len,
        };
        // SAFETY: UFFDIO_UNREGISTER reads a `struct uffdio_range` (16
        // bytes). It clears the registration (and stale protection bits) of
        // our range only; the mapping itself is untouched. Failure leaves
        // the range registered to a context that dies with `self.uffd`,
        // which the kernel then unregisters itself.
        unsafe { libc::ioctl(self.uffd.as_raw_fd(), UFFDIO_UNREGISTER, &range) };
    }
}

fn open_uffd() -> Result<OwnedFd> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    // SAFETY: the userfaultfd system call takes an int of flags and
    // returns a new descriptor or -1; no memory is passed.
    let mut fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags | UFFD_USER_MODE_ONLY) };
    if fd < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
        // Linux < 5.11 has no UFFD_USER_MODE_ONLY.
        // SAFETY: as above.
        fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    }
    if fd < 0 {
        let e = io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            Some(libc::EPERM) => WriteTrackerError::PermissionDenied(e),
            Some(libc::ENOSYS) => WriteTrackerError::Unsupported {
                what: "userfaultfd (CONFIG_USERFAULTFD)",
                source: e,
            },
            _ => WriteTrackerError::Io {
                op: "userfaultfd",
                source: e,
            },
        });
    }
    // SAFETY: `fd` is a descriptor the system call just returned to us
    // and nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

fn uffdio_api(uffd: &OwnedFd, api: &mut UffdioApi) -> Result<()> {
    // SAFETY: UFFDIO_API reads and writes a `struct uffdio_api` (24 bytes),
    // which `api` is, valid for the call.
    if unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_API, api as *mut UffdioApi) } < 0 {
        let e = io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            Some(libc::EINVAL) => WriteTrackerError::Unsupported {
                what: "the requested userfaultfd features",
                source: e,
            },
            _ => WriteTrackerError::Io {
                op: "UFFDIO_API",
                source: e,
            },
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uapi_sizes() {
        assert_eq!(std::mem::size_of::<UffdioApi>(), 24);
        assert_eq!(std::mem::size_of::<UffdioRange>(), 16);
        assert_eq!(std::mem::size_of::<UffdioRegister>(), 32);
        assert_eq!(std::mem::size_of::<UffdioWriteprotect>(), 24);
        assert_eq!(std::mem::size_of::<PageRegion>(), 24);
        assert_eq!(std::mem::size_of::<PmScanArg>(), 96);
        // _IOC(dir, type, nr, size) = dir << 30 | size << 16 | type << 8 | nr
        let ioc = |dir: u64, ty: u64, nr: u64, size: usize| {
            (dir << 30 | (size as u64) << 16 | ty << 8 | nr) as libc::c_ulong
        };
        let (rd, rw) = (2, 3);
        assert_eq!(UFFDIO_API, ioc(rw, 0xaa, 0x3f, 24));
        assert_eq!(UFFDIO_REGISTER, ioc(rw, 0xaa, 0x00, 32));
        assert_eq!(UFFDIO_UNREGISTER, ioc(rd, 0xaa, 0x01, 16));
        assert_eq!(UFFDIO_WRITEPROTECT, ioc(rw, 0xaa, 0x06, 24));
        assert_eq!(PAGEMAP_SCAN, ioc(rw, b'f' as u64, 16, 96));
    }

    #[test]
    fn refuses_bad_ranges() {
        let region = Arc::new(MmapRegion::<()>::new(8 * PAGE as usize).unwrap());
        let base = NonNull::new(region.as_ptr()).unwrap();
        // SAFETY: the range is inside `region`, alive for the whole test;
        // the call fails before registering anything.
        let e = unsafe { WriteTracker::from_raw_parts(base, 100) }.unwrap_err();
        assert!(matches!(e, WriteTrackerError::InvalidRange { .. }), "{e}");
        // SAFETY: as above.
        let e = unsafe { WriteTracker::from_raw_parts(base, 0) }.unwrap_err();
        assert!(matches!(e, WriteTrackerError::InvalidRange { .. }), "{e}");
    }
}
